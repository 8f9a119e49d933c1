//! The TPM credential store against a real TPM: swtpm, started by this harness
//! with its own state directory for each test. Keys made and used by the TPM,
//! readcaps opened through TPM ECDH, a TPM restart, wrong cookies and passwords,
//! and root credentials moved between file and TPM stores in both directions.
//!
//! Needs `swtpm` on the PATH (scripts/test installs it); built only with the
//! `tpm` feature.
#![cfg(feature = "tpm")]
// Tests unwrap what they set up themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blocktree_core::aead::SymmetricKey;
use blocktree_core::credstore::tpm::{Tcti, TpmCredStore};
use blocktree_core::credstore::{
    CredStore, CredStoreError, ExportedRoot, FileCredStore, RootPublicKeys, RuntimeSigner,
};
use blocktree_core::encoding;
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::hpke;
use blocktree_core::keys::{CryptoError, Signer};
use blocktree_core::readcap::{FileIds, ReadcapTable};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::Writecap;
use common::{contains_bytes, fast_kdf, path_under};
use tempfile::TempDir;

const PASSWORD: &str = "correct horse battery staple";

/// DER that starts every aws-lc PKCS#8 v1 P-256 private key (see credstore_file.rs).
const PKCS8_EC_PREFIX: [u8; 26] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01,
];

// ---- the swtpm harness --------------------------------------------------------

mod swtpm;
use swtpm::Swtpm;

/// The TCTI of `tpm`, parsed.
fn tcti_of(tpm: &Swtpm) -> Tcti {
    tpm.tcti_text().parse().unwrap()
}

/// A TPM and a directory for a store on it.
struct Scratch {
    tpm: Swtpm,
    _parent: TempDir,
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let parent = tempfile::tempdir().unwrap();
        Scratch {
            tpm: Swtpm::start(),
            dir: parent.path().join("store"),
            _parent: parent,
        }
    }

    fn create(&self) -> TpmCredStore {
        TpmCredStore::create(&self.dir, &tcti_of(&self.tpm))
            .unwrap()
            .with_kdf_params(fast_kdf())
            .unwrap()
    }

    fn open(&self) -> Result<TpmCredStore, CredStoreError> {
        TpmCredStore::open(&self.dir).map(|store| store.with_kdf_params(fast_kdf()).unwrap())
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn file_store(parent: &TempDir, name: &str) -> FileCredStore {
    FileCredStore::create(parent.path().join(name))
        .unwrap()
        .with_kdf_params(fast_kdf())
        .unwrap()
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn assert_signs_as(store: &dyn CredStore, message: &[u8]) {
    let signature = store.sign(message).unwrap();
    assert_eq!(
        store.signing_public_key().verify(message, &signature),
        Ok(())
    );
    let mut other = message.to_vec();
    other.push(0);
    assert_eq!(
        store.signing_public_key().verify(&other, &signature),
        Err(CryptoError::BadSignature)
    );
}

fn assert_root_signs(store: &dyn CredStore, password: &str, root: &RootPublicKeys) {
    let signer = store.root_signer(password).unwrap();
    assert_eq!(signer.public_key(), root.signing);
    let signature = signer.sign(b"root says so").unwrap();
    assert_eq!(root.signing.verify(b"root says so", &signature), Ok(()));
}

// ---- runtime keys ---------------------------------------------------------------

#[test]
fn keys_made_by_the_tpm_sign_and_survive_reopening() {
    let scratch = Scratch::new();
    let created = scratch.create();
    assert_signs_as(&created, b"hello");
    assert_ne!(
        created.encryption_public_key(),
        created.storage_public_key(),
        "the readcap key and the export key are distinct"
    );
    assert_eq!(created.tcti(), &tcti_of(&scratch.tpm));
    assert!(created.writecap().is_none());
    assert!(created.root_public().is_none());
    let principal = created.principal();
    drop(created);

    let opened = scratch.open().unwrap();
    assert_eq!(opened.principal(), principal);
    assert_signs_as(&opened, b"after reopening");
    // Through the runtime signer and the owned signer too.
    let signature = RuntimeSigner(&opened).sign(b"runtime").unwrap();
    assert_eq!(
        opened.signing_public_key().verify(b"runtime", &signature),
        Ok(())
    );
    let signer = opened.signer();
    assert_eq!(signer.principal(), principal);
    let signature = signer.sign(b"owned").unwrap();
    assert_eq!(
        opened.signing_public_key().verify(b"owned", &signature),
        Ok(())
    );

    // Two stores on two TPMs have different keys.
    let other = Scratch::new();
    let other = other.create();
    assert_ne!(other.principal(), principal);
    assert_ne!(other.storage_public_key(), opened.storage_public_key());
}

#[test]
fn signers_share_the_tpm_across_threads() {
    let scratch = Scratch::new();
    let store = scratch.create();
    let signer: Arc<dyn Signer + Send + Sync> = Arc::new(store.signer());
    let public = store.signing_public_key();
    let threads: Vec<_> = (0..4u8)
        .map(|index| {
            let signer = signer.clone();
            std::thread::spawn(move || {
                for round in 0..5u8 {
                    let message = [index, round];
                    let signature = signer.sign(&message).unwrap();
                    assert_eq!(public.verify(&message, &signature), Ok(()));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // The store keeps working while signers live, and signers after it is gone.
    assert_signs_as(&store, b"store");
    drop(store);
    let signature = signer.sign(b"signer outlives the store").unwrap();
    assert_eq!(
        public.verify(b"signer outlives the store", &signature),
        Ok(())
    );
}

#[test]
fn files_are_private_and_hold_no_private_key() {
    let scratch = Scratch::new();
    let mut store = scratch.create();
    let root = store.generate_root(PASSWORD).unwrap();
    assert_eq!(mode_of(&scratch.dir), 0o700);
    let mut names: Vec<String> = fs::read_dir(&scratch.dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["cookie", "tpm-root.cred", "tpm.cred"]);
    for name in &names {
        assert_eq!(mode_of(&scratch.file(name)), 0o600, "{name}");
    }
    assert_eq!(fs::read(scratch.file("cookie")).unwrap().len(), 32);
    // Neither the root keys nor any runtime key is written in the clear: the
    // runtime keys never leave the TPM, the root keys are encrypted.
    let runtime = fs::read(scratch.file("tpm.cred")).unwrap();
    let sealed_root = fs::read(scratch.file("tpm-root.cred")).unwrap();
    for bytes in [&runtime, &sealed_root] {
        assert!(!contains_bytes(bytes, &PKCS8_EC_PREFIX));
    }
    assert!(contains_bytes(
        &runtime,
        store.signing_public_key().as_sec1()
    ));
    assert!(contains_bytes(&sealed_root, root.signing.as_sec1()));
    // The runtime file is the project's encoding, a kind of its own.
    assert_eq!(
        encoding::kind_of(&runtime),
        Some(encoding::Kind::TpmRuntimeCreds)
    );
    assert_eq!(
        encoding::kind_of(&sealed_root),
        Some(encoding::Kind::TpmRootCreds)
    );
}

#[test]
fn create_refuses_an_existing_store_of_either_kind() {
    let scratch = Scratch::new();
    let _store = scratch.create();
    assert!(matches!(
        TpmCredStore::create(&scratch.dir, &tcti_of(&scratch.tpm)),
        Err(CredStoreError::AlreadyExists(dir)) if dir == scratch.dir
    ));
    assert!(TpmCredStore::exists_in(&scratch.dir));
    let parent = tempfile::tempdir().unwrap();
    let file = file_store(&parent, "file");
    assert!(!TpmCredStore::exists_in(file.dir()));
    assert!(matches!(
        TpmCredStore::create(file.dir(), &tcti_of(&scratch.tpm)),
        Err(CredStoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        TpmCredStore::open(parent.path().join("nothing")),
        Err(CredStoreError::NotFound(_))
    ));
}

// ---- readcaps -------------------------------------------------------------------

#[test]
fn readcaps_open_through_tpm_ecdh() {
    let scratch = Scratch::new();
    let store = scratch.create();
    let ids = FileIds {
        generation: 7,
        inode: 42,
    };
    let salt = [3u8; 32];
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

    // HPKE binds info and aad; the storage key does not open readcaps.
    let sealed = hpke::seal(&store.encryption_public_key(), b"info", b"aad", b"k").unwrap();
    assert_eq!(
        store
            .hpke_open(&sealed, b"info", b"aad")
            .unwrap()
            .as_slice(),
        b"k"
    );
    assert!(matches!(
        store.hpke_open(&sealed, b"info", b"other"),
        Err(CredStoreError::Crypto(CryptoError::DecryptFailed))
    ));
    let to_storage = hpke::seal(&store.storage_public_key(), b"info", b"aad", b"k").unwrap();
    assert!(matches!(
        store.hpke_open(&to_storage, b"info", b"aad"),
        Err(CredStoreError::Crypto(CryptoError::DecryptFailed))
    ));
}

// ---- a TPM restart ----------------------------------------------------------------

#[test]
fn keys_work_after_the_tpm_restarts() {
    let mut scratch = Scratch::new();
    let store = scratch.create();
    let principal = store.principal();
    let sealed = hpke::seal(&store.encryption_public_key(), b"i", b"a", b"file key").unwrap();
    let mut root_store = store;
    let root = root_store.generate_root(PASSWORD).unwrap();

    // The store stays open across the restart: it reconnects and loads its keys
    // again.
    scratch.tpm.restart();
    assert_signs_as(&root_store, b"after a restart");
    assert_eq!(
        root_store
            .hpke_open(&sealed, b"i", b"a")
            .unwrap()
            .as_slice(),
        b"file key"
    );
    assert_root_signs(&root_store, PASSWORD, &root);
    drop(root_store);

    // And a store opened after another restart.
    scratch.tpm.restart();
    let reopened = scratch.open().unwrap();
    assert_eq!(reopened.principal(), principal);
    assert_signs_as(&reopened, b"reopened after a restart");
    assert_eq!(
        reopened.hpke_open(&sealed, b"i", b"a").unwrap().as_slice(),
        b"file key"
    );
    assert_root_signs(&reopened, PASSWORD, &root);
}

#[test]
fn a_tpm_that_is_down_is_a_clear_error() {
    let mut scratch = Scratch::new();
    let store = scratch.create();
    drop(store);
    scratch.tpm.stop();
    let error = scratch.open().unwrap_err();
    assert!(matches!(error, CredStoreError::Tpm(_)), "{error}");
    let message = error.to_string();
    assert!(message.contains("cannot open the TPM"), "{message}");
    assert!(
        message.contains(&tcti_of(&scratch.tpm).to_string()),
        "{message}"
    );

    // A store that is open says so too, and recovers when the TPM is back.
    scratch.tpm.launch(Some(scratch.tpm.port));
    let store = scratch.open().unwrap();
    scratch.tpm.stop();
    let error = store.sign(b"x").unwrap_err();
    assert!(matches!(error, CredStoreError::Tpm(_)), "{error}");
    scratch.tpm.launch(Some(scratch.tpm.port));
    assert_signs_as(&store, b"back");
}

#[test]
fn keys_of_another_tpm_are_refused() {
    let scratch = Scratch::new();
    let store = scratch.create();
    drop(store);
    let other = Swtpm::start();
    let error = TpmCredStore::open_with(&scratch.dir, &tcti_of(&other)).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, CredStoreError::Tpm(_)), "{message}");
    assert!(message.contains("made by another TPM"), "{message}");
    assert!(message.contains("tpm.cred"), "{message}");
    // The same TPM reached explicitly is fine.
    let store = TpmCredStore::open_with(&scratch.dir, &tcti_of(&scratch.tpm)).unwrap();
    assert_signs_as(&store, b"same TPM");
}

#[test]
fn tcti_strings_are_checked() {
    for good in [
        "device:/dev/tpmrm0",
        "swtpm:host=127.0.0.1,port=2321",
        "mssim:host=localhost,port=2321",
        "tabrmd:bus_name=com.intel.tss2.Tabrmd",
    ] {
        let tcti: Tcti = good.parse().unwrap();
        assert_eq!(tcti.to_string(), good);
    }
    for bad in ["", "tpm", "swtpm:port=notanumber", "usb:/dev/x"] {
        let error = bad.parse::<Tcti>().unwrap_err();
        assert!(error.to_string().contains("is not a TCTI"), "{error}");
    }
    assert_eq!(Tcti::resource_manager().as_str(), "device:/dev/tpmrm0");
}

// ---- cookies and passwords --------------------------------------------------------

#[test]
fn a_wrong_cookie_is_refused_clearly() {
    let scratch = Scratch::new();
    let store = scratch.create();
    drop(store);
    let cookie = scratch.file("cookie");
    let genuine = fs::read(&cookie).unwrap();

    // Another cookie: refused before the TPM is asked.
    let mut wrong = genuine.clone();
    wrong[0] ^= 1;
    fs::write(&cookie, &wrong).unwrap();
    let error = scratch.open().unwrap_err();
    assert!(
        matches!(&error, CredStoreError::WrongCookie(file) if *file == cookie),
        "{error}"
    );
    assert!(error.to_string().contains("cookie"), "{error}");

    // Another cookie and a check value that matches it: the TPM itself refuses.
    let runtime = scratch.file("tpm.cred");
    let check = |cookie: &[u8]| {
        HashAlgorithm::Sha256
            .hash(&[b"blocktree tpm cookie check v1", cookie])
            .as_bytes()
            .to_vec()
    };
    let mut bytes = fs::read(&runtime).unwrap();
    let at = bytes
        .windows(32)
        .position(|window| window == check(&genuine).as_slice())
        .unwrap();
    bytes[at..at + 32].copy_from_slice(&check(&wrong));
    fs::write(&runtime, &bytes).unwrap();
    let store = scratch.open().unwrap();
    let error = store.sign(b"x").unwrap_err();
    assert!(
        matches!(&error, CredStoreError::WrongCookie(file) if *file == cookie),
        "{error}"
    );
    let sealed = hpke::seal(&store.encryption_public_key(), b"i", b"a", b"k").unwrap();
    assert!(matches!(
        store.hpke_open(&sealed, b"i", b"a"),
        Err(CredStoreError::WrongCookie(_))
    ));
    // The runtime keys are outside dictionary-attack protection: wrong cookies
    // do not lock the TPM. The genuine cookie still works after many tries.
    for _ in 0..5 {
        assert!(store.sign(b"x").is_err());
    }
    drop(store);
    fs::write(&cookie, &genuine).unwrap();
    bytes[at..at + 32].copy_from_slice(&check(&genuine));
    fs::write(&runtime, &bytes).unwrap();
    assert_signs_as(&scratch.open().unwrap(), b"genuine again");

    // A cookie others can read, or of the wrong length, is refused.
    fs::set_permissions(&cookie, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        scratch.open(),
        Err(CredStoreError::InsecurePermissions { .. })
    ));
    fs::set_permissions(&cookie, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&cookie, &genuine[..31]).unwrap();
    assert!(matches!(
        scratch.open(),
        Err(CredStoreError::Corrupt { .. })
    ));
    fs::remove_file(&cookie).unwrap();
    assert!(matches!(
        scratch.open(),
        Err(CredStoreError::Corrupt { .. })
    ));
}

#[test]
fn a_wrong_password_is_refused_and_counted_by_the_tpm() {
    let scratch = Scratch::new();
    let mut store = scratch.create();
    assert!(matches!(
        store.root_signer(PASSWORD).err().unwrap(),
        CredStoreError::NoRoot
    ));
    let root = store.generate_root(PASSWORD).unwrap();
    assert_root_signs(&store, PASSWORD, &root);
    assert!(matches!(
        store.generate_root(PASSWORD),
        Err(CredStoreError::RootExists(principal)) if principal == root.principal()
    ));

    let error = store.root_signer("not the password").err().unwrap();
    assert!(matches!(error, CredStoreError::WrongPassword), "{error}");
    assert!(matches!(
        store.export_root("Correct horse battery staple", &store.storage_public_key()),
        Err(CredStoreError::WrongPassword)
    ));
    // swtpm allows 3 failures before its dictionary-attack lockout; the third
    // wrong password trips it, and from then on the TPM refuses to try any.
    let _ = store.root_signer("third wrong password");
    let error = store.root_signer(PASSWORD).err().unwrap();
    assert!(matches!(error, CredStoreError::TpmLockout), "{error}");
    assert!(error.to_string().contains("lockout"), "{error}");
    // The runtime keys are not affected.
    assert_signs_as(&store, b"still signing");
}

// ---- root credentials between stores ---------------------------------------------

#[test]
fn root_credentials_move_from_a_file_store_to_the_tpm_and_on_to_another_file_store() {
    let parent = tempfile::tempdir().unwrap();
    let mut origin = file_store(&parent, "origin");
    let root = origin.generate_root(PASSWORD).unwrap();

    // File store -> TPM store (reopened, so its keys are all loaded and the TPM
    // must make room to seal the root).
    let scratch = Scratch::new();
    drop(scratch.create());
    let mut tpm = scratch.open().unwrap();
    let exported = origin
        .export_root(PASSWORD, &tpm.storage_public_key())
        .unwrap();
    let exported: ExportedRoot = encoding::decode(&encoding::encode(&exported)).unwrap();
    assert!(matches!(
        tpm.import_root("wrong password", &exported),
        Err(CredStoreError::WrongPassword)
    ));
    assert_eq!(tpm.import_root(PASSWORD, &exported).unwrap(), root);
    assert_eq!(tpm.root_public(), Some(root));
    assert_root_signs(&tpm, PASSWORD, &root);
    assert!(matches!(
        tpm.import_root(PASSWORD, &exported),
        Err(CredStoreError::RootExists(_))
    ));
    drop(tpm);
    let tpm = scratch.open().unwrap();
    assert_eq!(tpm.root_public(), Some(root));
    assert_root_signs(&tpm, PASSWORD, &root);

    // TPM store -> another file store.
    let mut backup = file_store(&parent, "backup");
    let exported = tpm
        .export_root(PASSWORD, &backup.storage_public_key())
        .unwrap();
    assert_eq!(exported.public, root);
    assert_eq!(backup.import_root(PASSWORD, &exported).unwrap(), root);
    assert_root_signs(&backup, PASSWORD, &root);
    assert_root_signs(&FileCredStore::open(backup.dir()).unwrap(), PASSWORD, &root);

    // The root in the TPM store issues writecaps, and a TPM runtime imports one.
    let signer = tpm.root_signer(PASSWORD).unwrap();
    let writecap = Writecap::issue(
        &*signer,
        None,
        tpm.principal(),
        path_under(root.principal(), &["servers"]),
        Timestamp::now().after(Duration::from_secs(3600)),
        Timestamp::now(),
    )
    .unwrap();
    drop(signer);
    let mut tpm = tpm;
    tpm.set_writecap(writecap.clone()).unwrap();
    // swtpm has no resource manager: one store on it at a time.
    drop(tpm);
    assert_eq!(scratch.open().unwrap().writecap(), Some(&writecap));
}

#[test]
fn an_export_for_another_store_does_not_import() {
    let parent = tempfile::tempdir().unwrap();
    let mut origin = file_store(&parent, "origin");
    origin.generate_root(PASSWORD).unwrap();
    let intended = file_store(&parent, "intended");
    let scratch = Scratch::new();
    let mut tpm = scratch.create();
    let exported = origin
        .export_root(PASSWORD, &intended.storage_public_key())
        .unwrap();
    assert!(matches!(
        tpm.import_root(PASSWORD, &exported),
        Err(CredStoreError::NotForThisStore)
    ));
    // Addressed to the TPM store's readcap key instead of its storage key.
    let misaddressed = origin
        .export_root(PASSWORD, &tpm.encryption_public_key())
        .unwrap();
    assert!(matches!(
        tpm.import_root(PASSWORD, &misaddressed),
        Err(CredStoreError::NotForThisStore)
    ));
    assert!(tpm.root_public().is_none());
    assert!(!scratch.file("tpm-root.cred").exists());
}

#[test]
fn root_credentials_move_between_two_tpm_stores() {
    let (a, b) = (Scratch::new(), Scratch::new());
    let mut first = a.create();
    let root = first.generate_root(PASSWORD).unwrap();
    let mut second = b.create();
    let exported = first
        .export_root(PASSWORD, &second.storage_public_key())
        .unwrap();
    assert_eq!(second.import_root(PASSWORD, &exported).unwrap(), root);
    assert_root_signs(&second, PASSWORD, &root);
}
