//! Signed file metadata: it round-trips, verifies, and any change after signing
//! (to any field, or to any bit of its encoding) is caught.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::LazyLock;

use blocktree_core::BtPath;
use blocktree_core::aead::SymmetricKey;
use blocktree_core::encoding::{self, DecodeError, Kind};
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::keys::{
    CryptoError, EncryptionKeyPair, SIGNATURE_LEN, Signature, Signer, SigningKeyPair,
    SigningPublicKey,
};
use blocktree_core::metadata::{
    FileMeta, FileTime, KeyState, MetaBody, MetaError, MetaSecrets, SecretsPart, VerifiedSignatures,
};
use blocktree_core::readcap::{EpochKeyTable, FileIds, ParentTable, ReadcapTable, SALT_LEN};
use blocktree_core::sector::{EPOCH_SEAL_LIMIT, SealError, SectorSealer};
use blocktree_core::writecap::{RevocationList, Writecap, WritecapError};
use common::{NOW, nobody_revoked, now_plus, path_of, principal_of, root_grant, signing_key};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

/// A domain with a generation directory `/R/gen`, a writer holding a writecap
/// over it, and a second writer with its own.
struct Fixture {
    writer: SigningKeyPair,
    other_writer: SigningKeyPair,
    directory: BtPath,
    writecap: Writecap,
    /// The same grant to the same writer, with another expiry.
    reissued_writecap: Writecap,
    other_writecap: Writecap,
    sibling: BtPath,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let root = signing_key();
    let writer = signing_key();
    let other_writer = signing_key();
    let directory = path_of(&root, &["gen"]);
    Fixture {
        writecap: root_grant(&root, &writer, directory.clone(), now_plus(3600)),
        reissued_writecap: root_grant(&root, &writer, directory.clone(), now_plus(7200)),
        other_writecap: root_grant(&root, &other_writer, directory.clone(), now_plus(3600)),
        sibling: path_of(&root, &["other"]),
        writer,
        other_writer,
        directory,
    }
});

/// What a generated file looks like; turned into a signed `FileMeta` by `build`.
#[derive(Clone, Debug)]
struct Plan {
    ids: FileIds,
    sector_size: u32,
    algorithm: HashAlgorithm,
    merkle_input: Vec<u8>,
    salt: [u8; SALT_LEN],
    readers: usize,
    parents: Vec<(u64, u64)>,
    /// Epochs (the newest seals) and seals already made under the newest.
    encryption: Option<(Vec<u32>, u64)>,
    secrets: MetaSecrets,
}

/// A signed file with the keys needed to read its secrets.
struct Built {
    meta: FileMeta,
    file_key: SymmetricKey,
    epoch_keys: Option<BTreeMap<u32, SymmetricKey>>,
}

prop_compose! {
    fn file_time()(seconds in any::<i64>(), nanos in 0u32..1_000_000_000) -> FileTime {
        FileTime { seconds, nanos }
    }
}

prop_compose! {
    fn meta_secrets()(
        (uid, gid, mode) in any::<(u32, u32, u32)>(),
        size in any::<u64>(),
        (atime, mtime, ctime) in (file_time(), file_time(), file_time()),
        xattrs in prop::collection::btree_map(
            prop::collection::vec(any::<u8>(), 1..12),
            prop::collection::vec(any::<u8>(), 0..24),
            0..4,
        ),
        cache_seconds in any::<u32>(),
    ) -> MetaSecrets {
        MetaSecrets {
            uid,
            gid,
            mode,
            size,
            nlink: 1,
            atime,
            mtime,
            ctime,
            xattrs: xattrs
                .into_iter()
                .map(|(name, value)| (ByteBuf::from(name), ByteBuf::from(value)))
                .collect(),
            cache_seconds,
        }
    }
}

prop_compose! {
    fn plan()(
        (generation, inode) in any::<(u64, u64)>(),
        sector_size in prop_oneof![Just(4096u32), Just(512), 1u32..=(1 << 20)],
        algorithm in prop_oneof![Just(HashAlgorithm::Sha256), Just(HashAlgorithm::Sha512)],
        merkle_input in prop::collection::vec(any::<u8>(), 0..64),
        salt in any::<[u8; SALT_LEN]>(),
        readers in 0usize..3,
        parents in prop::collection::vec(any::<(u64, u64)>(), 0..3),
        encryption in prop::option::of((
            prop::collection::btree_set(any::<u32>(), 1..4),
            0..EPOCH_SEAL_LIMIT - 1,
        )),
        secrets in meta_secrets(),
    ) -> Plan {
        Plan {
            ids: FileIds { generation, inode },
            sector_size,
            algorithm,
            merkle_input,
            salt,
            readers,
            parents,
            encryption: encryption.map(|(epochs, seals)| (epochs.into_iter().collect(), seals)),
            secrets,
        }
    }
}

fn key() -> SymmetricKey {
    SymmetricKey::generate().unwrap()
}

fn build(plan: &Plan) -> Built {
    let fixture = &*FIXTURE;
    let file_key = key();
    let mut readcaps = ReadcapTable::default();
    for _ in 0..plan.readers {
        let reader = EncryptionKeyPair::generate().unwrap();
        readcaps
            .grant(
                plan.algorithm,
                &plan.salt,
                plan.ids,
                reader.public(),
                &file_key,
            )
            .unwrap();
    }
    let mut parents = ParentTable::default();
    for &(generation, inode) in &plan.parents {
        let parent = FileIds { generation, inode };
        parents
            .grant(&plan.salt, plan.ids, parent, &key(), &file_key)
            .unwrap();
    }
    let mut body = MetaBody {
        ids: plan.ids,
        sector_size: plan.sector_size,
        hash_algorithm: plan.algorithm,
        merkle_root: plan.algorithm.hash(&[&plan.merkle_input]),
        sector_count: 1,
        writer: *fixture.writer.public(),
        writecap: fixture.writecap.clone(),
        readcaps,
        parents,
        salt: plan.salt,
        keys: None,
        secrets: SecretsPart::Clear(MetaSecrets::default()),
    };
    let epoch_keys = match &plan.encryption {
        None => {
            body.set_secrets(&plan.secrets, None).unwrap();
            None
        }
        Some((epochs, seals_so_far)) => {
            let mut table = EpochKeyTable::default();
            let mut keys = BTreeMap::new();
            for &epoch in epochs {
                keys.insert(epoch, table.add_epoch(plan.ids, epoch, &file_key).unwrap());
            }
            let current = table.current().unwrap();
            body.keys = Some(KeyState {
                epoch: current,
                seals_in_epoch: *seals_so_far,
                epoch_keys: table,
            });
            let sealer = SectorSealer::new(current, &keys[&current], *seals_so_far).unwrap();
            body.set_secrets(&plan.secrets, Some((&sealer, &keys[&current])))
                .unwrap();
            assert_eq!(body.keys.as_ref().unwrap().seals_in_epoch, seals_so_far + 1);
            assert!(matches!(body.secrets, SecretsPart::Sealed { epoch, .. } if epoch == current));
            Some(keys)
        }
    };
    Built {
        meta: FileMeta::sign(body, &fixture.writer).unwrap(),
        file_key,
        epoch_keys,
    }
}

fn verify(meta: &FileMeta) -> Result<(), MetaError> {
    meta.verify(&FIXTURE.directory, NOW, &nobody_revoked())
}

fn round_trip(meta: &FileMeta) -> FileMeta {
    encoding::decode(&encoding::encode(meta)).unwrap()
}

/// `body` under the signature `signed` carries: what an attacker who edits a
/// stored metadata sector produces. There is deliberately no constructor for
/// this, so it is built in the encoding: sign `body` with its writecap's
/// subject, then put the old signature in place of the new one (the signature
/// is the encoding's last 64 bytes).
fn with_old_signature(body: MetaBody, signed: &FileMeta) -> FileMeta {
    let fixture = &*FIXTURE;
    let signer = if body.writecap.subject() == Some(principal_of(&fixture.other_writer)) {
        &fixture.other_writer
    } else {
        &fixture.writer
    };
    let resigned = FileMeta::sign(body, signer).unwrap();
    let mut encoded = encoding::encode(&resigned);
    assert!(encoded.ends_with(resigned.signature().as_bytes()));
    let at = encoded.len() - SIGNATURE_LEN;
    encoded[at..].copy_from_slice(signed.signature().as_bytes());
    let tampered: FileMeta = encoding::decode(&encoded).unwrap();
    assert_eq!(tampered.signature(), signed.signature());
    tampered
}

type Edit = (&'static str, Box<dyn Fn(&mut MetaBody) -> bool>);

/// Every single-field change; each returns false when it does not apply.
fn edits() -> Vec<Edit> {
    fn clear(body: &mut MetaBody) -> Option<&mut MetaSecrets> {
        match &mut body.secrets {
            SecretsPart::Clear(secrets) => Some(secrets),
            SecretsPart::Sealed { .. } => None,
        }
    }
    fn on_clear(edit: impl Fn(&mut MetaSecrets) + 'static) -> Box<dyn Fn(&mut MetaBody) -> bool> {
        Box::new(move |body| clear(body).map(&edit).is_some())
    }
    fn sealed(body: &mut MetaBody) -> Option<(&mut u32, &mut ByteBuf)> {
        match &mut body.secrets {
            SecretsPart::Sealed { epoch, sealed } => Some((epoch, sealed)),
            SecretsPart::Clear(_) => None,
        }
    }
    fn always(edit: impl Fn(&mut MetaBody) + 'static) -> Box<dyn Fn(&mut MetaBody) -> bool> {
        Box::new(move |body| {
            edit(body);
            true
        })
    }
    let xattr = || {
        (
            ByteBuf::from(b"user.extra".to_vec()),
            ByteBuf::from(b"1".to_vec()),
        )
    };
    vec![
        ("ids.generation", always(|b| b.ids.generation ^= 1)),
        ("ids.inode", always(|b| b.ids.inode ^= 1 << 63)),
        ("sector_size", always(|b| b.sector_size ^= 0x200)),
        (
            "hash_algorithm",
            always(|b| {
                b.hash_algorithm = match b.hash_algorithm {
                    HashAlgorithm::Sha256 => HashAlgorithm::Sha512,
                    HashAlgorithm::Sha512 => HashAlgorithm::Sha256,
                }
            }),
        ),
        (
            "merkle_root",
            always(|b| {
                let algorithm = b.merkle_root.algorithm();
                b.merkle_root = algorithm.hash(&[b"another tree", b.merkle_root.as_bytes()]);
            }),
        ),
        (
            "merkle_root algorithm",
            always(|b| {
                let other = match b.merkle_root.algorithm() {
                    HashAlgorithm::Sha256 => HashAlgorithm::Sha512,
                    HashAlgorithm::Sha512 => HashAlgorithm::Sha256,
                };
                b.merkle_root = other.hash(&[b"x"]);
            }),
        ),
        (
            "writecap reissued",
            always(|b| b.writecap = FIXTURE.reissued_writecap.clone()),
        ),
        (
            "writer and writecap swapped to another writer",
            always(|b| b.writecap = FIXTURE.other_writecap.clone()),
        ),
        (
            "readcaps: one more reader",
            always(|b| {
                let reader = EncryptionKeyPair::generate().unwrap();
                b.readcaps
                    .grant(
                        HashAlgorithm::Sha256,
                        &b.salt,
                        b.ids,
                        reader.public(),
                        &key(),
                    )
                    .unwrap();
            }),
        ),
        (
            "readcaps: all removed",
            Box::new(|b| {
                let had = !b.readcaps.is_empty();
                b.readcaps = ReadcapTable::default();
                had
            }),
        ),
        (
            "parents: one more",
            always(|b| {
                let parent = FileIds {
                    generation: 1,
                    inode: 2,
                };
                b.parents
                    .grant(&b.salt, b.ids, parent, &key(), &key())
                    .unwrap();
            }),
        ),
        (
            "parents: all removed",
            Box::new(|b| {
                let had = !b.parents.is_empty();
                b.parents = ParentTable::default();
                had
            }),
        ),
        ("salt", always(|b| b.salt[SALT_LEN / 2] ^= 0x10)),
        (
            "keys: encryption switched off",
            Box::new(|b| b.keys.take().is_some()),
        ),
        (
            "keys: encryption switched on",
            Box::new(|b| {
                let was_clear = b.keys.is_none();
                b.keys = Some(KeyState {
                    epoch: 0,
                    seals_in_epoch: 0,
                    epoch_keys: EpochKeyTable::default(),
                });
                was_clear
            }),
        ),
        (
            "keys.epoch",
            Box::new(|b| {
                b.keys
                    .as_mut()
                    .map(|k| k.epoch = k.epoch.wrapping_add(1))
                    .is_some()
            }),
        ),
        (
            "keys.seals_in_epoch",
            Box::new(|b| b.keys.as_mut().map(|k| k.seals_in_epoch += 1).is_some()),
        ),
        (
            "keys.epoch_keys: an epoch added",
            Box::new(|b| {
                let ids = b.ids;
                b.keys
                    .as_mut()
                    .map(|k| {
                        let next = k.epoch_keys.current().unwrap_or(0).wrapping_add(1);
                        k.epoch_keys.add_epoch(ids, next, &key()).unwrap();
                    })
                    .is_some()
            }),
        ),
        ("secrets.uid", on_clear(|s| s.uid ^= 1)),
        ("secrets.gid", on_clear(|s| s.gid ^= 1)),
        ("secrets.mode", on_clear(|s| s.mode ^= 0o002)),
        ("secrets.size", on_clear(|s| s.size ^= 1 << 40)),
        ("secrets.atime", on_clear(|s| s.atime.seconds ^= 1)),
        (
            "secrets.mtime",
            on_clear(|s| s.mtime.nanos = (s.mtime.nanos + 1) % 1_000_000_000),
        ),
        ("secrets.ctime", on_clear(|s| s.ctime.seconds ^= 1 << 62)),
        ("secrets.cache_seconds", on_clear(|s| s.cache_seconds ^= 1)),
        (
            "secrets.xattrs: one added",
            on_clear(move |s| {
                let (name, value) = xattr();
                s.xattrs.insert(name, value);
            }),
        ),
        (
            "secrets.xattrs: a value changed",
            Box::new(|b| {
                clear(b)
                    .and_then(|s| s.xattrs.values_mut().next())
                    .map(|value| value.push(0))
                    .is_some()
            }),
        ),
        (
            "secrets.xattrs: one removed",
            Box::new(|b| clear(b).and_then(|s| s.xattrs.pop_first()).is_some()),
        ),
        (
            "secrets: clear turned sealed",
            Box::new(|b| {
                let was_clear = clear(b).is_some();
                b.secrets = SecretsPart::Sealed {
                    epoch: 0,
                    sealed: ByteBuf::from(vec![0; 40]),
                };
                was_clear
            }),
        ),
        (
            "secrets: sealed epoch",
            Box::new(|b| sealed(b).map(|(epoch, _)| *epoch ^= 1).is_some()),
        ),
        (
            "secrets: sealed first byte",
            Box::new(|b| sealed(b).map(|(_, bytes)| bytes[0] ^= 1).is_some()),
        ),
        (
            "secrets: sealed last byte",
            Box::new(|b| {
                sealed(b)
                    .map(|(_, bytes)| *bytes.last_mut().unwrap() ^= 0x80)
                    .is_some()
            }),
        ),
        (
            "secrets: sealed truncated",
            Box::new(|b| {
                sealed(b)
                    .map(|(_, bytes)| {
                        let len = bytes.len();
                        bytes.truncate(len - 1)
                    })
                    .is_some()
            }),
        ),
        (
            "secrets: sealed turned clear",
            Box::new(|b| {
                let was_sealed = sealed(b).is_some();
                b.secrets = SecretsPart::Clear(MetaSecrets::default());
                was_sealed
            }),
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn signed_metadata_round_trips_and_verifies(plan in plan()) {
        let built = build(&plan);
        let decoded = round_trip(&built.meta);
        prop_assert_eq!(&decoded, &built.meta);
        prop_assert!(verify(&decoded).is_ok());
        prop_assert_eq!(decoded.body().writer, *FIXTURE.writer.public());
        let opened = decoded.body().secrets(built.epoch_keys.as_ref()).unwrap();
        prop_assert_eq!(opened, plan.secrets);
    }

    #[test]
    fn changing_any_field_after_signing_breaks_the_signature(plan in plan()) {
        let built = build(&plan);
        let original = built.meta.body().clone();
        let mut applied = 0;
        for (what, edit) in edits() {
            let mut body = original.clone();
            if !edit(&mut body) {
                continue;
            }
            prop_assert_ne!(&body, &original, "{} changed nothing", what);
            let tampered = with_old_signature(body, &built.meta);
            prop_assert!(
                matches!(verify(&tampered), Err(MetaError::BadSignature)),
                "{}: {:?}", what, verify(&tampered)
            );
            applied += 1;
        }
        prop_assert!(applied >= 20, "only {} edits applied", applied);
    }

    #[test]
    fn changing_only_the_writer_key_breaks_the_writecap_match(plan in plan()) {
        let built = build(&plan);
        let mut encoded = encoding::encode(&built.meta);
        let writer = FIXTURE.writer.public().as_sec1();
        let at = encoded.windows(writer.len()).position(|w| w == writer).unwrap();
        encoded[at..at + writer.len()].copy_from_slice(FIXTURE.other_writer.public().as_sec1());
        let tampered: FileMeta = encoding::decode(&encoded).unwrap();
        prop_assert_eq!(tampered.body().writer, *FIXTURE.other_writer.public());
        let result = verify(&tampered);
        assert!(
            matches!(result, Err(MetaError::Writecap(WritecapError::WrongSubject { .. }))),
            "{result:?}"
        );
    }

    #[test]
    fn no_single_bit_flip_survives_decoding_and_verification(
        plan in plan(),
        bits in prop::collection::vec(any::<prop::sample::Index>(), 16),
    ) {
        let built = build(&plan);
        let encoded = encoding::encode(&built.meta);
        for bit in bits {
            let bit = bit.index(encoded.len() * 8);
            let mut flipped = encoded.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            if let Ok(meta) = encoding::decode::<FileMeta>(&flipped) {
                prop_assert!(verify(&meta).is_err(), "bit {} flipped and still verifies", bit);
            }
        }
    }

    #[test]
    fn sealed_secrets_open_with_the_epoch_keys_only(plan in plan()) {
        prop_assume!(plan.encryption.is_some());
        let built = build(&plan);
        let body = built.meta.body();
        let SecretsPart::Sealed { epoch, .. } = body.secrets else {
            return Err(TestCaseError::fail("encrypted file with clear secrets"));
        };
        // The epoch keys come back from the signed key table with the file key.
        let keys = body
            .keys
            .as_ref()
            .unwrap()
            .epoch_keys
            .open_all(body.ids, &built.file_key)
            .unwrap();
        prop_assert_eq!(&keys, built.epoch_keys.as_ref().unwrap());
        prop_assert_eq!(body.secrets(Some(&keys)).unwrap(), plan.secrets.clone());

        prop_assert!(matches!(body.secrets(None), Err(MetaError::EncryptionMismatch(_))));
        let mut missing = keys.clone();
        missing.remove(&epoch);
        prop_assert!(matches!(
            body.secrets(Some(&missing)),
            Err(MetaError::NoEpochKey(e)) if e == epoch
        ));
        let mut wrong = keys.clone();
        wrong.insert(epoch, key());
        prop_assert!(matches!(
            body.secrets(Some(&wrong)),
            Err(MetaError::Secrets(CryptoError::DecryptFailed))
        ));
        // Sealed secrets are bound to the file: under other ids they do not open.
        let mut moved = body.clone();
        moved.ids.inode ^= 1;
        prop_assert!(matches!(
            moved.secrets(Some(&keys)),
            Err(MetaError::Secrets(CryptoError::DecryptFailed))
        ));
        // Nothing of the plaintext secrets is visible in the encoding.
        let encoded = encoding::encode(&built.meta);
        for name in plan.secrets.xattrs.keys().filter(|name| name.len() >= 8) {
            prop_assert!(!common::contains_bytes(&encoded, name));
        }
    }
}

fn sample_plan(encrypted: bool) -> Plan {
    Plan {
        ids: FileIds {
            generation: 7,
            inode: 42,
        },
        sector_size: 4096,
        algorithm: HashAlgorithm::Sha256,
        merkle_input: b"data".to_vec(),
        salt: [3; SALT_LEN],
        readers: 1,
        parents: vec![(7, 1)],
        encryption: encrypted.then(|| (vec![0, 1], 10)),
        secrets: MetaSecrets {
            uid: 1000,
            gid: 1000,
            mode: 0o100644,
            size: 12345,
            xattrs: BTreeMap::from([(
                ByteBuf::from(b"user.comment-attribute".to_vec()),
                ByteBuf::from(b"hello".to_vec()),
            )]),
            cache_seconds: 30,
            ..MetaSecrets::default()
        },
    }
}

#[test]
fn clear_secrets_read_without_keys() {
    let plan = sample_plan(false);
    let built = build(&plan);
    assert!(built.epoch_keys.is_none());
    assert_eq!(built.meta.body().secrets(None).unwrap(), plan.secrets);
    assert!(matches!(verify(&built.meta), Ok(())));
}

#[test]
fn a_directory_outside_the_writecap_is_refused() {
    let built = build(&sample_plan(true));
    let fixture = &*FIXTURE;
    for directory in [fixture.sibling.clone(), fixture.directory.parent().unwrap()] {
        let result = built.meta.verify(&directory, NOW, &nobody_revoked());
        assert!(
            matches!(
                &result,
                Err(MetaError::Writecap(WritecapError::PathNotCovered { target, .. }))
                    if *target == directory
            ),
            "{result:?}"
        );
    }
    // A subdirectory of the generation's directory is covered.
    let inside = fixture.directory.join("sub").unwrap();
    assert!(built.meta.verify(&inside, NOW, &nobody_revoked()).is_ok());
}

#[test]
fn an_expired_or_revoked_writecap_is_refused() {
    let built = build(&sample_plan(false));
    assert!(matches!(
        built
            .meta
            .verify(&FIXTURE.directory, now_plus(3600), &nobody_revoked()),
        Err(MetaError::Writecap(WritecapError::Expired { index: 0, .. }))
    ));
    let mut revoked = RevocationList::new();
    revoked.revoke(principal_of(&FIXTURE.writer));
    assert!(matches!(
        built.meta.verify(&FIXTURE.directory, NOW, &revoked),
        Err(MetaError::Writecap(WritecapError::Revoked(who))) if who == principal_of(&FIXTURE.writer)
    ));
}

/// A cache hit skips signature checks only for byte-identical metadata, and
/// never the checks that change with time: after the original verified (and was
/// remembered), an edit under the old signature is still refused, and so is
/// the original once its writecap expired or its writer was revoked.
#[test]
fn remembered_signatures_never_excuse_a_change_an_expiry_or_a_revocation() {
    let fixture = &*FIXTURE;
    let cache = VerifiedSignatures::new(4, 4);
    let built = build(&sample_plan(true));
    for _ in 0..2 {
        built
            .meta
            .verify_cached(&cache, &fixture.directory, NOW, &nobody_revoked())
            .unwrap();
    }
    let mut body = built.meta.body().clone();
    body.sector_count += 1;
    let tampered = with_old_signature(body, &built.meta);
    assert!(matches!(
        tampered.verify_cached(&cache, &fixture.directory, NOW, &nobody_revoked()),
        Err(MetaError::BadSignature)
    ));
    still_judged_on_time_revocation_and_place(&built.meta, &cache);
    // More metadata than the cache holds is still verified correctly.
    for inode in 0..10 {
        let mut plan = sample_plan(false);
        plan.ids.inode = inode;
        let meta = build(&plan).meta;
        meta.verify_cached(&cache, &fixture.directory, NOW, &nobody_revoked())
            .unwrap();
    }
}

#[test]
fn accepted_metadata_skips_only_its_signature_check() {
    let fixture = &*FIXTURE;
    let cache = VerifiedSignatures::new(4, 4);
    let built = build(&sample_plan(true));
    built.meta.remember_accepted(&cache);
    // A forged signature over an edit is not what was accepted: checked afresh.
    let mut body = built.meta.body().clone();
    body.sector_count += 1;
    let tampered = with_old_signature(body, &built.meta);
    assert!(matches!(
        tampered.verify_cached(&cache, &fixture.directory, NOW, &nobody_revoked()),
        Err(MetaError::BadSignature)
    ));
    // The accepted metadata itself passes, while expiry, revocation and the
    // directory are still judged on every read.
    built
        .meta
        .verify_cached(&cache, &fixture.directory, NOW, &nobody_revoked())
        .unwrap();
    still_judged_on_time_revocation_and_place(&built.meta, &cache);
}

/// A remembered signature never excuses an expired writecap, a revoked writer or
/// another directory.
fn still_judged_on_time_revocation_and_place(meta: &FileMeta, cache: &VerifiedSignatures) {
    let fixture = &*FIXTURE;
    assert!(matches!(
        meta.verify_cached(cache, &fixture.directory, now_plus(3600), &nobody_revoked()),
        Err(MetaError::Writecap(WritecapError::Expired { index: 0, .. }))
    ));
    let mut revoked = RevocationList::new();
    revoked.revoke(principal_of(&fixture.writer));
    assert!(matches!(
        meta.verify_cached(cache, &fixture.directory, NOW, &revoked),
        Err(MetaError::Writecap(WritecapError::Revoked(_)))
    ));
    assert!(
        meta.verify_cached(cache, &fixture.sibling, NOW, &nobody_revoked())
            .is_err()
    );
}

/// A signer outside this process (as a TPM is), here one whose signatures do
/// not verify under the key it names: the writer's key, signing with another.
struct Elsewhere<'a> {
    claims: &'a SigningKeyPair,
    signs_with: &'a SigningKeyPair,
}

impl Signer for Elsewhere<'_> {
    fn public_key(&self) -> SigningPublicKey {
        *self.claims.public()
    }
    fn sign(&self, message: &[u8]) -> Result<Signature, CryptoError> {
        self.signs_with.sign(message)
    }
}

#[test]
fn metadata_signed_here_skips_only_its_own_signature_check() {
    let fixture = &*FIXTURE;
    let built = build(&sample_plan(true));
    verify(&built.meta).unwrap();
    // Decoded, it is the same metadata and its signature is checked for real.
    let decoded = round_trip(&built.meta);
    assert_eq!(decoded, built.meta);
    verify(&decoded).unwrap();
    // Time, revocation and place are judged as for any metadata.
    still_judged_on_time_revocation_and_place(&built.meta, &VerifiedSignatures::new(4, 4));
    // A signer from elsewhere is checked even on the metadata it just signed.
    let elsewhere = Elsewhere {
        claims: &fixture.writer,
        signs_with: &fixture.other_writer,
    };
    let forged = FileMeta::sign(built.meta.into_body(), &elsewhere).unwrap();
    assert!(matches!(verify(&forged), Err(MetaError::BadSignature)));
    let cache = VerifiedSignatures::new(4, 4);
    assert!(matches!(
        forged.verify_cached(&cache, &fixture.directory, NOW, &nobody_revoked()),
        Err(MetaError::BadSignature)
    ));
}

#[test]
fn only_the_writecap_subject_can_sign() {
    let built = build(&sample_plan(true));
    let body = built.meta.into_body();
    assert!(matches!(
        FileMeta::sign(body.clone(), &FIXTURE.other_writer),
        Err(MetaError::SignerNotSubject)
    ));
    assert!(matches!(
        FileMeta::sign(body.clone(), &signing_key()),
        Err(MetaError::SignerNotSubject)
    ));
    let mut no_writecap = body.clone();
    no_writecap.writecap = Writecap::from_chain(Vec::new());
    assert!(matches!(
        FileMeta::sign(no_writecap, &FIXTURE.writer),
        Err(MetaError::SignerNotSubject)
    ));
    // The subject may sign again after an edit, and the result verifies.
    let mut edited = body;
    edited.sector_size = 8192;
    let resigned = FileMeta::sign(edited, &FIXTURE.writer).unwrap();
    assert!(verify(&resigned).is_ok());
}

#[test]
fn set_secrets_refuses_a_mismatch_between_keys_and_sealer() {
    let built = build(&sample_plan(false));
    let mut clear = built.meta.body().clone();
    let epoch_key = key();
    let sealer = SectorSealer::new(0, &epoch_key, 0).unwrap();
    assert!(matches!(
        clear.set_secrets(&MetaSecrets::default(), Some((&sealer, &epoch_key))),
        Err(MetaError::EncryptionMismatch(_))
    ));
    let encrypted = build(&sample_plan(true));
    let mut sealed = encrypted.meta.body().clone();
    assert!(matches!(
        sealed.set_secrets(&MetaSecrets::default(), None),
        Err(MetaError::EncryptionMismatch(_))
    ));
}

#[test]
fn an_exhausted_epoch_refuses_to_seal_secrets() {
    let built = build(&sample_plan(true));
    let mut body = built.meta.body().clone();
    let keys = built.epoch_keys.unwrap();
    let epoch = body.keys.as_ref().unwrap().epoch;
    let sealer = SectorSealer::new(epoch, &keys[&epoch], EPOCH_SEAL_LIMIT).unwrap();
    assert!(matches!(
        body.set_secrets(&MetaSecrets::default(), Some((&sealer, &keys[&epoch]))),
        Err(MetaError::Seal(SealError::EpochExhausted(e))) if e == epoch
    ));
}

#[test]
fn metadata_decodes_only_as_metadata() {
    let built = build(&sample_plan(true));
    let encoded = encoding::encode(&built.meta);
    assert_eq!(encoding::kind_of(&encoded), Some(Kind::FileMeta));
    assert!(matches!(
        encoding::decode::<Writecap>(&encoded),
        Err(DecodeError::WrongKind {
            expected: Kind::Writecap,
            ..
        })
    ));
    let writecap = encoding::encode(&FIXTURE.writecap);
    assert!(matches!(
        encoding::decode::<FileMeta>(&writecap),
        Err(DecodeError::WrongKind {
            expected: Kind::FileMeta,
            ..
        })
    ));
    for len in [0, 1, 2, encoded.len() / 2, encoded.len() - 1] {
        assert!(encoding::decode::<FileMeta>(&encoded[..len]).is_err());
    }
}
