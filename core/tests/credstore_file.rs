//! The file credential store: what it writes, what it refuses to read, root
//! credentials under a password, and moving them between stores.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use blocktree_core::aead::SymmetricKey;
use blocktree_core::credstore::{
    CredStore, CredStoreError, ExportedRoot, FileCredStore, KdfParams, RootPublicKeys,
    RuntimeSigner,
};
use blocktree_core::encoding;
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::hpke;
use blocktree_core::keys::{CryptoError, Signer};
use blocktree_core::readcap::{FileIds, ReadcapTable};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{Writecap, WritecapError};
use common::{contains_bytes, fast_kdf, path_under, signing_key};
use tempfile::TempDir;

const PASSWORD: &str = "correct horse battery staple";
const RUNTIME_FILE: &str = "runtime.cred";
const ROOT_FILE: &str = "root.cred";

/// DER that starts every aws-lc PKCS#8 v1 P-256 private key: SEQUENCE, version 0,
/// AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
const PKCS8_EC_PREFIX: [u8; 26] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01,
];

/// A store in a directory the store itself creates (so its mode is the store's).
struct Scratch {
    _parent: TempDir,
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        Scratch {
            _parent: parent,
            dir,
        }
    }

    fn create(&self) -> FileCredStore {
        FileCredStore::create(&self.dir)
            .unwrap()
            .with_kdf_params(fast_kdf())
            .unwrap()
    }

    fn open(&self) -> Result<FileCredStore, CredStoreError> {
        FileCredStore::open(&self.dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A fresh store holding a root generated under `PASSWORD`.
fn store_with_root() -> (Scratch, FileCredStore, RootPublicKeys) {
    let scratch = Scratch::new();
    let mut store = scratch.create();
    let root = store.generate_root(PASSWORD).unwrap();
    (scratch, store, root)
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn open_error(scratch: &Scratch) -> CredStoreError {
    scratch.open().err().unwrap()
}

/// Checks that `store` can sign as `root` with `password`.
fn assert_root_signs(store: &FileCredStore, password: &str, root: &RootPublicKeys) {
    let signer = store.root_signer(password).unwrap();
    assert_eq!(signer.public_key(), root.signing);
    assert_eq!(signer.principal(), root.principal());
    let signature = signer.sign(b"root says so").unwrap();
    assert_eq!(root.signing.verify(b"root says so", &signature), Ok(()));
    assert_eq!(
        root.signing.verify(b"root says no", &signature),
        Err(CryptoError::BadSignature)
    );
}

fn root_signer_error(store: &FileCredStore, password: &str) -> CredStoreError {
    store.root_signer(password).err().unwrap()
}

// ---- runtime credentials ----------------------------------------------------

#[test]
fn create_then_open_keeps_the_principal_and_keys() {
    let scratch = Scratch::new();
    let created = scratch.create();
    let opened = scratch.open().unwrap();
    assert_eq!(opened.principal(), created.principal());
    assert_eq!(opened.signing_public_key(), created.signing_public_key());
    assert_eq!(
        opened.encryption_public_key(),
        created.encryption_public_key()
    );
    assert_eq!(opened.storage_public_key(), created.storage_public_key());
    assert_ne!(
        created.encryption_public_key(),
        created.storage_public_key(),
        "the readcap key and the export key are distinct"
    );
    assert_eq!(opened.dir(), scratch.dir.as_path());
    assert!(opened.writecap().is_none());
    assert!(opened.root_public().is_none());

    // The reopened store signs with the same key.
    let signature = opened.sign(b"hello").unwrap();
    assert_eq!(
        created.signing_public_key().verify(b"hello", &signature),
        Ok(())
    );
    let runtime = RuntimeSigner(&opened);
    assert_eq!(runtime.principal(), created.principal());
    let signature = runtime.sign(b"again").unwrap();
    assert_eq!(
        created.signing_public_key().verify(b"again", &signature),
        Ok(())
    );
}

#[test]
fn two_stores_have_different_keys() {
    let (a, b) = (Scratch::new(), Scratch::new());
    let (a, b) = (a.create(), b.create());
    assert_ne!(a.principal(), b.principal());
    assert_ne!(a.encryption_public_key(), b.encryption_public_key());
    assert_ne!(a.storage_public_key(), b.storage_public_key());
}

#[test]
fn create_refuses_an_existing_store() {
    let scratch = Scratch::new();
    let _store = scratch.create();
    assert!(matches!(
        FileCredStore::create(&scratch.dir),
        Err(CredStoreError::AlreadyExists(dir)) if dir == scratch.dir
    ));
}

#[test]
fn files_are_0600_and_the_directory_0700() {
    let (scratch, mut store, _) = store_with_root();
    assert_eq!(mode_of(&scratch.dir), 0o700);
    assert_eq!(mode_of(&scratch.file(RUNTIME_FILE)), 0o600);
    assert_eq!(mode_of(&scratch.file(ROOT_FILE)), 0o600);
    // Rewriting the runtime file (on set_writecap) keeps the mode too.
    let writecap = self_rooted_writecap(&store, Timestamp::now().after(hour()));
    store.set_writecap(writecap).unwrap();
    assert_eq!(mode_of(&scratch.file(RUNTIME_FILE)), 0o600);
    // Nothing else is left behind (no temporary files).
    let names: BTreeSet<String> = fs::read_dir(&scratch.dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([RUNTIME_FILE.into(), ROOT_FILE.into()])
    );
}

#[test]
fn opening_a_missing_directory_is_not_found() {
    let scratch = Scratch::new();
    assert!(matches!(
        open_error(&scratch),
        CredStoreError::NotFound(dir) if dir == scratch.dir
    ));
    // An existing but empty directory is no store either.
    fs::create_dir(&scratch.dir).unwrap();
    assert!(matches!(open_error(&scratch), CredStoreError::NotFound(_)));
}

#[test]
fn a_garbage_runtime_file_is_corrupt_and_named() {
    let scratch = Scratch::new();
    let _store = scratch.create();
    let runtime = scratch.file(RUNTIME_FILE);
    let valid = fs::read(&runtime).unwrap();
    for garbage in [
        b"not a credential store".to_vec(),
        Vec::new(),
        valid[..valid.len() / 2].to_vec(),
        [valid.as_slice(), &[0]].concat(),
    ] {
        fs::write(&runtime, &garbage).unwrap();
        assert_eq!(mode_of(&runtime), 0o600);
        let error = open_error(&scratch);
        assert!(
            matches!(&error, CredStoreError::Corrupt { file, .. } if *file == runtime),
            "{error}"
        );
        assert!(error.to_string().contains(RUNTIME_FILE), "{error}");
    }
}

#[test]
fn another_kind_of_file_in_place_of_the_runtime_file_is_corrupt() {
    let (scratch, _store, _) = store_with_root();
    let runtime = scratch.file(RUNTIME_FILE);
    fs::write(&runtime, fs::read(scratch.file(ROOT_FILE)).unwrap()).unwrap();
    assert!(matches!(
        open_error(&scratch),
        CredStoreError::Corrupt { file, .. } if file == runtime
    ));
}

#[test]
fn a_garbage_root_file_is_corrupt_and_named() {
    let (scratch, _store, _) = store_with_root();
    let root = scratch.file(ROOT_FILE);
    fs::write(&root, b"\x01\x05garbage").unwrap();
    let error = open_error(&scratch);
    assert!(
        matches!(&error, CredStoreError::Corrupt { file, .. } if *file == root),
        "{error}"
    );
    assert!(error.to_string().contains(ROOT_FILE));
}

#[test]
fn a_root_file_with_out_of_range_kdf_parameters_is_corrupt() {
    let (scratch, _store, root) = store_with_root();
    let path = scratch.file(ROOT_FILE);
    let mut bytes = fs::read(&path).unwrap();
    // The KDF parameters follow the root's public keys: 1024 KiB, 1 pass, 1 lane.
    let encryption = root.encryption.as_sec1();
    let at = bytes
        .windows(encryption.len())
        .position(|window| window == encryption)
        .unwrap()
        + encryption.len();
    assert_eq!(
        bytes[at..at + 4],
        [0x80, 0x08, 0x01, 0x01],
        "layout changed"
    );
    bytes[at + 3] = 0; // zero lanes
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        open_error(&scratch),
        CredStoreError::Corrupt { file, .. } if file == path
    ));
}

#[test]
fn a_runtime_file_readable_by_others_is_refused() {
    let scratch = Scratch::new();
    let _store = scratch.create();
    let runtime = scratch.file(RUNTIME_FILE);
    for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
        set_mode(&runtime, mode);
        assert!(
            matches!(
                open_error(&scratch),
                CredStoreError::InsecurePermissions { file, mode: found }
                    if file == runtime && found == mode
            ),
            "mode {mode:o}"
        );
    }
    set_mode(&runtime, 0o400);
    assert!(scratch.open().is_ok(), "owner-only modes are fine");
}

#[test]
fn a_root_file_readable_by_others_is_refused() {
    let (scratch, _store, _) = store_with_root();
    let root = scratch.file(ROOT_FILE);
    set_mode(&root, 0o640);
    assert!(matches!(
        open_error(&scratch),
        CredStoreError::InsecurePermissions { file, mode: 0o640 } if file == root
    ));
}

#[test]
fn kdf_parameters_out_of_range_are_refused() {
    let scratch = Scratch::new();
    let store = FileCredStore::create(&scratch.dir).unwrap();
    let too_cheap = KdfParams {
        memory_kib: 4,
        iterations: 1,
        parallelism: 1,
    };
    assert!(matches!(
        store.with_kdf_params(too_cheap),
        Err(CredStoreError::KdfParams(_))
    ));
    for params in [
        KdfParams {
            iterations: 0,
            ..fast_kdf()
        },
        KdfParams {
            parallelism: 0,
            ..fast_kdf()
        },
        KdfParams {
            memory_kib: KdfParams::MAX_MEMORY_KIB + 1,
            ..fast_kdf()
        },
    ] {
        assert!(matches!(params.check(), Err(CredStoreError::KdfParams(_))));
    }
    assert!(fast_kdf().check().is_ok());
    assert!(KdfParams::default().check().is_ok());
}

// ---- root credentials -------------------------------------------------------

#[test]
fn a_generated_root_signs_with_the_right_password() {
    let (scratch, store, root) = store_with_root();
    assert_eq!(store.root_public(), Some(root));
    assert_ne!(
        root.principal(),
        store.principal(),
        "root is not the runtime"
    );
    assert_root_signs(&store, PASSWORD, &root);
    // And after reopening.
    let reopened = scratch.open().unwrap();
    assert_eq!(reopened.root_public(), Some(root));
    assert_root_signs(&reopened, PASSWORD, &root);
}

#[test]
fn a_root_with_default_kdf_parameters_works() {
    let scratch = Scratch::new();
    let mut store = FileCredStore::create(&scratch.dir).unwrap();
    let root = store.generate_root(PASSWORD).unwrap();
    assert_root_signs(&store, PASSWORD, &root);
    assert!(matches!(
        root_signer_error(&store, "wrong"),
        CredStoreError::WrongPassword
    ));
}

#[test]
fn a_wrong_password_is_refused() {
    let (_scratch, store, root) = store_with_root();
    for wrong in [
        "",
        "correct horse battery stapl",
        "Correct horse battery staple",
    ] {
        assert!(matches!(
            root_signer_error(&store, wrong),
            CredStoreError::WrongPassword
        ));
        assert!(matches!(
            store.export_root(wrong, &store.storage_public_key()),
            Err(CredStoreError::WrongPassword)
        ));
    }
    assert_root_signs(&store, PASSWORD, &root);
}

#[test]
fn generating_a_second_root_is_refused() {
    let (scratch, mut store, root) = store_with_root();
    let before = fs::read(scratch.file(ROOT_FILE)).unwrap();
    assert!(matches!(
        store.generate_root("another"),
        Err(CredStoreError::RootExists(principal)) if principal == root.principal()
    ));
    assert_eq!(fs::read(scratch.file(ROOT_FILE)).unwrap(), before);
    let mut reopened = scratch.open().unwrap();
    assert!(matches!(
        reopened.generate_root("another"),
        Err(CredStoreError::RootExists(_))
    ));
}

#[test]
fn a_store_without_a_root_says_so() {
    let scratch = Scratch::new();
    let store = scratch.create();
    assert!(matches!(
        root_signer_error(&store, PASSWORD),
        CredStoreError::NoRoot
    ));
    assert!(matches!(
        store.export_root(PASSWORD, &store.storage_public_key()),
        Err(CredStoreError::NoRoot)
    ));
}

#[test]
fn the_root_private_key_is_never_written_in_the_clear() {
    let (scratch, store, root) = store_with_root();
    let root_file = fs::read(scratch.file(ROOT_FILE)).unwrap();
    let runtime_file = fs::read(scratch.file(RUNTIME_FILE)).unwrap();
    // Control: the runtime key is kept as plaintext PKCS#8, and the probe finds it.
    assert!(contains_bytes(&runtime_file, &PKCS8_EC_PREFIX));
    assert!(!contains_bytes(&root_file, &PKCS8_EC_PREFIX));
    // The root file names its keys, but they are not the runtime's.
    assert!(contains_bytes(&root_file, root.signing.as_sec1()));
    assert!(!contains_bytes(&runtime_file, root.signing.as_sec1()));

    // The same root sealed again (imported into another store) looks different:
    // fresh salt and nonce.
    let other = Scratch::new();
    let mut receiver = other.create();
    let exported = store
        .export_root(PASSWORD, &receiver.storage_public_key())
        .unwrap();
    assert!(!contains_bytes(&exported.outer, &PKCS8_EC_PREFIX));
    receiver.import_root(PASSWORD, &exported).unwrap();
    let resealed = fs::read(other.file(ROOT_FILE)).unwrap();
    assert!(!contains_bytes(&resealed, &PKCS8_EC_PREFIX));
    assert_ne!(resealed, root_file);
    assert_eq!(resealed.len(), root_file.len());
    // Same public part, different sealed tail.
    let tail = 64;
    assert_ne!(
        resealed[resealed.len() - tail..],
        root_file[root_file.len() - tail..]
    );
}

// ---- export and import ------------------------------------------------------

#[test]
fn export_then_import_moves_the_root() {
    let (_a, sender, root) = store_with_root();
    let b = Scratch::new();
    let mut receiver = b.create();
    let exported = sender
        .export_root(PASSWORD, &receiver.storage_public_key())
        .unwrap();
    assert_eq!(exported.public, root);
    // It travels in the binary format.
    let decoded: ExportedRoot = encoding::decode(&encoding::encode(&exported)).unwrap();
    assert_eq!(decoded, exported);

    assert_eq!(receiver.import_root(PASSWORD, &decoded).unwrap(), root);
    assert_eq!(receiver.root_public(), Some(root));
    assert_root_signs(&receiver, PASSWORD, &root);
    let reopened = b.open().unwrap();
    assert_eq!(reopened.root_public(), Some(root));
    assert_root_signs(&reopened, PASSWORD, &root);

    // A second import is refused: the store already holds a root.
    assert!(matches!(
        receiver.import_root(PASSWORD, &exported),
        Err(CredStoreError::RootExists(principal)) if principal == root.principal()
    ));
}

#[test]
fn import_with_a_wrong_password_is_refused() {
    let (_a, sender, _) = store_with_root();
    let b = Scratch::new();
    let mut receiver = b.create();
    let exported = sender
        .export_root(PASSWORD, &receiver.storage_public_key())
        .unwrap();
    assert!(matches!(
        receiver.import_root("not the password", &exported),
        Err(CredStoreError::WrongPassword)
    ));
    assert!(receiver.root_public().is_none());
    assert!(!b.file(ROOT_FILE).exists());
}

#[test]
fn import_into_a_store_it_was_not_made_for_is_refused() {
    let (_a, sender, _) = store_with_root();
    let (b, c) = (Scratch::new(), Scratch::new());
    let intended = b.create();
    let mut third = c.create();
    let exported = sender
        .export_root(PASSWORD, &intended.storage_public_key())
        .unwrap();
    assert!(matches!(
        third.import_root(PASSWORD, &exported),
        Err(CredStoreError::NotForThisStore)
    ));
    assert!(third.root_public().is_none());
    // Exported to the runtime encryption key instead of the storage key: refused too.
    let mut receiver = intended;
    let misaddressed = sender
        .export_root(PASSWORD, &receiver.encryption_public_key())
        .unwrap();
    assert!(matches!(
        receiver.import_root(PASSWORD, &misaddressed),
        Err(CredStoreError::NotForThisStore)
    ));
}

#[test]
fn a_tampered_export_is_refused() {
    let (_a, sender, _) = store_with_root();
    let (_other_scratch, other_root_store, other_root) = store_with_root();
    drop(other_root_store);
    let b = Scratch::new();
    let mut receiver = b.create();
    let exported = sender
        .export_root(PASSWORD, &receiver.storage_public_key())
        .unwrap();
    let outer_len = exported.outer.len();
    let mut tampered: Vec<(&str, ExportedRoot)> = Vec::new();
    for at in [0, 12, outer_len / 2, outer_len - 1] {
        let mut copy = exported.clone();
        copy.outer[at] ^= 0x04;
        tampered.push(("outer byte", copy));
    }
    let mut copy = exported.clone();
    copy.outer.truncate(outer_len - 1);
    tampered.push(("outer truncated", copy));
    let mut copy = exported.clone();
    copy.public = other_root;
    tampered.push(("public keys of another root", copy));
    let mut copy = exported.clone();
    copy.salt[0] ^= 1;
    tampered.push(("salt", copy));
    let mut copy = exported.clone();
    copy.kdf.iterations += 1;
    tampered.push(("kdf iterations", copy));
    for (what, copy) in &tampered {
        let result = receiver.import_root(PASSWORD, copy);
        // The outer AES-GCM layer cannot tell a wrong password from tampering.
        assert!(
            matches!(result, Err(CredStoreError::WrongPassword)),
            "{what}: {result:?}"
        );
    }
    // Bit flips anywhere in the sealed part of the encoding.
    let encoded = encoding::encode(&exported);
    let sealed_start = encoded.len() - outer_len;
    for byte in (sealed_start..encoded.len()).step_by(7) {
        let mut flipped = encoded.clone();
        flipped[byte] ^= 1 << (byte % 8);
        if let Ok(copy) = encoding::decode::<ExportedRoot>(&flipped) {
            assert!(
                receiver.import_root(PASSWORD, &copy).is_err(),
                "byte {byte}"
            );
        }
    }
    for len in [0, 2, encoded.len() / 2, encoded.len() - 1] {
        assert!(encoding::decode::<ExportedRoot>(&encoded[..len]).is_err());
    }
    assert!(receiver.root_public().is_none());
    // The genuine export still imports.
    receiver.import_root(PASSWORD, &exported).unwrap();
}

// ---- writecaps --------------------------------------------------------------

fn hour() -> std::time::Duration {
    std::time::Duration::from_secs(3600)
}

/// A writecap for `store`'s runtime, signed by the store's own root.
fn self_rooted_writecap(store: &FileCredStore, expires: Timestamp) -> Writecap {
    let root = store.root_signer(PASSWORD).unwrap();
    let path = path_under(root.principal(), &["servers"]);
    Writecap::issue(
        &*root,
        None,
        store.principal(),
        path,
        expires,
        Timestamp::now(),
    )
    .unwrap()
}

#[test]
fn a_writecap_for_this_runtime_is_kept() {
    let (scratch, mut store, _) = store_with_root();
    let writecap = self_rooted_writecap(&store, Timestamp::now().after(hour()));
    store.set_writecap(writecap.clone()).unwrap();
    assert_eq!(store.writecap(), Some(&writecap));
    let reopened = scratch.open().unwrap();
    assert_eq!(reopened.writecap(), Some(&writecap));
    // The reopened store's signing key is the writecap's subject.
    assert_eq!(writecap.subject(), Some(reopened.principal()));
}

#[test]
fn a_writecap_issued_by_another_stores_root_is_kept() {
    let (_a, operator, root) = store_with_root();
    let b = Scratch::new();
    let mut server = b.create();
    let signer = operator.root_signer(PASSWORD).unwrap();
    let path = path_under(root.principal(), &["gen1"]);
    let writecap = Writecap::issue(
        &*signer,
        None,
        server.principal(),
        path,
        Timestamp::now().after(hour()),
        Timestamp::now(),
    )
    .unwrap();
    server.set_writecap(writecap.clone()).unwrap();
    assert_eq!(b.open().unwrap().writecap(), Some(&writecap));
}

#[test]
fn a_writecap_issued_to_someone_else_is_refused() {
    let (scratch, mut store, _) = store_with_root();
    let root = store.root_signer(PASSWORD).unwrap();
    let someone = signing_key();
    let writecap = Writecap::issue(
        &*root,
        None,
        someone.public().principal(),
        path_under(root.principal(), &["x"]),
        Timestamp::now().after(hour()),
        Timestamp::now(),
    )
    .unwrap();
    drop(root);
    let expected = store.principal();
    assert!(matches!(
        store.set_writecap(writecap),
        Err(CredStoreError::Writecap(WritecapError::WrongSubject { expected: e, found }))
            if e == expected && found == someone.public().principal()
    ));
    assert!(store.writecap().is_none());
    assert!(scratch.open().unwrap().writecap().is_none());
}

#[test]
fn an_expired_writecap_is_refused() {
    let (_scratch, mut store, _) = store_with_root();
    let expired = Timestamp(Timestamp::now().0 - 60);
    let writecap = self_rooted_writecap(&store, expired);
    assert!(matches!(
        store.set_writecap(writecap),
        Err(CredStoreError::Writecap(WritecapError::Expired { index: 0, expired: at }))
            if at == expired
    ));
    assert!(store.writecap().is_none());
}

#[test]
fn an_empty_writecap_is_refused() {
    let scratch = Scratch::new();
    let mut store = scratch.create();
    assert!(matches!(
        store.set_writecap(Writecap::from_chain(Vec::new())),
        Err(CredStoreError::Writecap(WritecapError::Empty))
    ));
}

// ---- HPKE -------------------------------------------------------------------

#[test]
fn hpke_open_opens_what_was_sealed_to_the_encryption_key() {
    let scratch = Scratch::new();
    let store = scratch.create();
    let sealed = hpke::seal(
        &store.encryption_public_key(),
        b"info",
        b"aad",
        b"the file key",
    )
    .unwrap();
    assert_eq!(
        store
            .hpke_open(&sealed, b"info", b"aad")
            .unwrap()
            .as_slice(),
        b"the file key"
    );
    for (info, aad) in [(&b"other"[..], &b"aad"[..]), (b"info", b"other")] {
        assert!(matches!(
            store.hpke_open(&sealed, info, aad),
            Err(CredStoreError::Crypto(CryptoError::DecryptFailed))
        ));
    }
    // What is sealed to the storage key (exports) is not opened by hpke_open.
    let to_storage = hpke::seal(&store.storage_public_key(), b"info", b"aad", b"x").unwrap();
    assert!(matches!(
        store.hpke_open(&to_storage, b"info", b"aad"),
        Err(CredStoreError::Crypto(CryptoError::DecryptFailed))
    ));
    // The reopened store opens it too.
    let reopened = scratch.open().unwrap();
    assert_eq!(
        reopened
            .hpke_open(&sealed, b"info", b"aad")
            .unwrap()
            .as_slice(),
        b"the file key"
    );
}

#[test]
fn a_readcap_sealed_to_the_store_opens_through_it() {
    let scratch = Scratch::new();
    let store = scratch.create();
    let ids = FileIds {
        generation: 5,
        inode: 6,
    };
    let salt = [1u8; 32];
    let file_key = SymmetricKey::generate().unwrap();
    let mut table = ReadcapTable::default();
    table
        .grant(
            HashAlgorithm::Sha256,
            &salt,
            ids,
            &store.encryption_public_key(),
            &file_key,
        )
        .unwrap();
    assert_eq!(table.open(&salt, ids, &store).unwrap(), file_key);
    let reopened = scratch.open().unwrap();
    assert_eq!(table.open(&salt, ids, &reopened).unwrap(), file_key);
}
