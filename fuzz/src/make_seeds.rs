//! Writes small valid inputs for each fuzz target to `fuzz/seeds/<target>/`.
//!
//! Valid encodings carry real curve points, signatures and ciphertexts, which a
//! fuzzer cannot find on its own; starting from them lets it mutate the fields
//! behind those checks. Keys are fresh on every run (the targets check signatures
//! against the keys inside the inputs), except the fixed ones of `blocktree_fuzz`,
//! which the targets use to open sealed parts.
//!
//! Run: `cargo run --release --features seeds --bin make-seeds [-- <out dir>]`.

use std::collections::BTreeMap;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use blocktree_core::BtPath;
use blocktree_core::credstore::{CredStore, FileCredStore, KdfParams};
use blocktree_core::encoding::{self, Encodable};
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::hpke;
use blocktree_core::keys::{CryptoError, EncryptionPublicKey, Signer, SigningKeyPair};
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::{FileMeta, FileTime, KeyState, MetaBody, MetaSecrets, SecretsPart};
use blocktree_core::provision::WritecapRequest;
use blocktree_core::readcap::{EpochKeyTable, FileIds, ParentTable, ReadcapTable, SALT_LEN};
use blocktree_core::sector::{SectorId, SectorKind, SectorSealer};
use blocktree_core::writecap::{RevocationList, Writecap};
use blocktree_fuzz::{
    EPOCH, HPKE_INFO, HpkeInput, NOW, PARENT, SECTOR, SEED_EXPIRES, epoch_key, file_key,
    hpke_receiver, parent_key, sector_opener,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The largest seed written; seeds are committed.
const MAX_SEED_LEN: usize = 4096;

struct Seeds {
    root: PathBuf,
}

impl Seeds {
    fn write(&self, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
        if bytes.len() >= MAX_SEED_LEN {
            return Err(format!("seed {target}/{name} is {} bytes", bytes.len()).into());
        }
        let dir = self.root.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
        Ok(())
    }

    /// Writes an encodable seed for its own target and for `encoding_kinds`.
    fn encoded<T: Encodable>(&self, target: Option<&str>, name: &str, value: &T) -> Result<()> {
        let bytes = encoding::encode(value);
        if let Some(target) = target {
            self.write(target, name, &bytes)?;
        }
        self.write("encoding_kinds", name, &bytes)
    }
}

/// A temporary directory for a credential store, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("blocktree-seeds-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn main() -> Result<()> {
    let root = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds"),
    };
    let seeds = Seeds { root };

    // Writecaps: root → delegate → writer.
    let root_key = SigningKeyPair::generate()?;
    let delegate = SigningKeyPair::generate()?;
    let writer = SigningKeyPair::generate()?;
    let domain = BtPath::root_of(root_key.principal());
    let home = domain.join("home")?;
    let alice = home.join("alice")?;
    let direct = Writecap::issue(
        &root_key,
        None,
        writer.principal(),
        alice.clone(),
        SEED_EXPIRES,
        NOW,
    )?;
    let to_delegate = Writecap::issue(
        &root_key,
        None,
        delegate.principal(),
        home.clone(),
        SEED_EXPIRES,
        NOW,
    )?;
    let chained = Writecap::issue(
        &delegate,
        Some(&to_delegate),
        writer.principal(),
        alice.clone(),
        SEED_EXPIRES,
        NOW,
    )?;
    let soon = Writecap::issue(
        &root_key,
        None,
        writer.principal(),
        domain.clone(),
        blocktree_core::time::Timestamp(NOW.0 + 1),
        NOW,
    )?;
    for (name, writecap) in [
        ("direct", &direct),
        ("chained", &chained),
        ("expiring", &soon),
    ] {
        writecap.validate(
            writecap.path().ok_or("empty writecap")?,
            NOW,
            &RevocationList::new(),
        )?;
        seeds.encoded(Some("writecap"), &format!("writecap-{name}"), writecap)?;
    }
    let mut revoked = RevocationList::new();
    revoked.revoke(delegate.principal());
    revoked.revoke(writer.principal());
    seeds.encoded(None, "revocation-list", &revoked)?;

    // Paths.
    for (name, path) in [("root", &domain), ("alice", &alice)] {
        seeds.write("path", name, path.to_string().as_bytes())?;
    }
    seeds.write(
        "path",
        "unicode",
        alice.join("é x.txt")?.to_string().as_bytes(),
    )?;

    // Merkle trees and proofs.
    let mut trees = Vec::new();
    trees.push(("empty", MerkleTree::new(HashAlgorithm::Sha256)));
    let mut one = MerkleTree::new(HashAlgorithm::Sha256);
    one.update(0, b"only sector")?;
    trees.push(("one", one));
    let mut holes = MerkleTree::new(HashAlgorithm::Sha256);
    holes.update(6, b"sector six")?;
    holes.update(2, b"sector two")?;
    trees.push(("holes", holes));
    let mut full = MerkleTree::new(HashAlgorithm::Sha256);
    for index in 0..21u8 {
        full.update(u64::from(index), &[index; 3])?;
    }
    trees.push(("twenty-one", full));
    let mut sha512 = MerkleTree::new(HashAlgorithm::Sha512);
    for index in 0..5u8 {
        sha512.update(u64::from(index), &[index])?;
    }
    trees.push(("sha512", sha512));
    for (name, tree) in &trees {
        seeds.encoded(Some("merkle_tree"), &format!("merkle-tree-{name}"), tree)?;
        for index in [
            0,
            tree.leaf_count() / 2,
            tree.leaf_count().saturating_sub(1),
        ] {
            if let Ok(proof) = tree.proof(index) {
                seeds.encoded(
                    Some("merkle_proof"),
                    &format!("merkle-proof-{name}-{index}"),
                    &proof,
                )?;
            }
        }
    }

    // Metadata: one file encrypted (secrets sealed under an epoch key wrapped by
    // the fixed file key), one in the clear.
    let ids = FileIds {
        generation: 1,
        inode: 5,
    };
    let salt = [9u8; SALT_LEN];
    let secrets = MetaSecrets {
        uid: 1000,
        gid: 1000,
        mode: 0o100644,
        size: 8192,
        nlink: 1,
        atime: FileTime {
            seconds: 1_700_000_000,
            nanos: 5,
        },
        mtime: FileTime {
            seconds: 1_700_000_001,
            nanos: 999_999_999,
        },
        ctime: FileTime {
            seconds: -1,
            nanos: 0,
        },
        xattrs: BTreeMap::from([(
            serde_bytes::ByteBuf::from(b"user.tag".to_vec()),
            serde_bytes::ByteBuf::from(b"fuzz".to_vec()),
        )]),
        cache_seconds: 30,
    };
    seeds.encoded(None, "meta-secrets", &secrets)?;
    let mut readcaps = ReadcapTable::default();
    readcaps.grant(
        HashAlgorithm::Sha256,
        &salt,
        ids,
        hpke_receiver().public(),
        &file_key(),
    )?;
    let mut parents = ParentTable::default();
    parents.grant(&salt, ids, PARENT, &parent_key(), &file_key())?;
    let mut epoch_keys = EpochKeyTable::default();
    let file_epoch_key = epoch_keys.add_epoch(ids, EPOCH, &file_key())?;
    let sealer = SectorSealer::new(EPOCH, &file_epoch_key, 0)?;
    let (_, tree) = &trees[2];
    let mut body = MetaBody {
        ids,
        sector_size: 4096,
        hash_algorithm: HashAlgorithm::Sha256,
        merkle_root: tree.root(),
        sector_count: tree.leaf_count(),
        writer: *writer.public(),
        writecap: chained.clone(),
        readcaps,
        parents,
        salt,
        keys: Some(KeyState {
            epoch: EPOCH,
            seals_in_epoch: 0,
            epoch_keys,
        }),
        secrets: SecretsPart::Clear(MetaSecrets::default()),
    };
    body.set_secrets(&secrets, Some((&sealer, &file_epoch_key)))?;
    let encrypted = FileMeta::sign(body.clone(), &writer)?;
    encrypted.verify(&alice, NOW, &RevocationList::new())?;
    let opened = encrypted
        .body()
        .keys
        .as_ref()
        .ok_or("no keys")?
        .epoch_keys
        .open_all(ids, &file_key())?;
    assert_eq!(encrypted.body().secrets(Some(&opened))?, secrets);
    encrypted
        .body()
        .parents
        .open(&salt, ids, PARENT, &parent_key())?;
    seeds.encoded(Some("metadata"), "metadata-encrypted", &encrypted)?;
    body.keys = None;
    body.readcaps = ReadcapTable::default();
    body.writecap = direct.clone();
    body.set_secrets(&secrets, None)?;
    let clear = FileMeta::sign(body, &writer)?;
    clear.verify(&alice, NOW, &RevocationList::new())?;
    seeds.encoded(Some("metadata"), "metadata-clear", &clear)?;

    // A writecap request and an exported root, from real credential stores.
    let runtime_dir = TempDir::new("runtime");
    let runtime = FileCredStore::create(&runtime_dir.0)?;
    for (name, path) in [("with-path", Some(alice.clone())), ("no-path", None)] {
        let request = WritecapRequest::new(&runtime, path)?;
        request.verify()?;
        seeds.encoded(
            Some("writecap_request"),
            &format!("writecap-request-{name}"),
            &request,
        )?;
    }
    let root_dir = TempDir::new("root");
    let cheap = KdfParams {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    };
    let mut root_store = FileCredStore::create(&root_dir.0)?.with_kdf_params(cheap)?;
    root_store.generate_root("seed password")?;
    let exported = root_store.export_root("seed password", &runtime.storage_public_key())?;
    seeds.encoded(Some("exported_root"), "exported-root", &exported)?;
    // credstore_files: a selector byte (0: runtime.cred, 1: root.cred), then the file.
    for (selector, name, dir) in [
        (0u8, "runtime.cred", &runtime_dir.0),
        (1, "root.cred", &root_dir.0),
    ] {
        let mut seed = vec![selector];
        seed.extend(fs::read(dir.join(name))?);
        seeds.write("credstore_files", name, &seed)?;
    }
    let provisioned_dir = TempDir::new("provisioned");
    let mut provisioned = FileCredStore::create(&provisioned_dir.0)?;
    let granted = Writecap::issue(
        &root_key,
        None,
        provisioned.principal(),
        alice.clone(),
        SEED_EXPIRES,
        NOW,
    )?;
    provisioned.set_writecap(granted)?;
    let mut seed = vec![0u8];
    seed.extend(fs::read(provisioned_dir.0.join("runtime.cred"))?);
    seeds.write("credstore_files", "runtime-with-writecap.cred", &seed)?;

    // Sector records sealed for the fixed sector under the fixed epoch key.
    let sealer = SectorSealer::new(EPOCH, &epoch_key(), 0)?;
    for len in [0usize, 1, 16, 100, 512] {
        let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let record = sealer.seal_to_vec(&SECTOR, &plaintext)?;
        assert_eq!(sector_opener().open_to_vec(&SECTOR, &record)?, plaintext);
        seeds.write("sector_record", &format!("record-{len}"), &record)?;
    }
    let elsewhere = SectorId {
        sector: SectorKind::Meta,
        ..SECTOR
    };
    seeds.write(
        "sector_record",
        "record-other-sector",
        &sealer.seal_to_vec(&elsewhere, b"meta")?,
    )?;

    // HPKE ciphertexts to the fixed receiver.
    for (name, aad, plaintext) in [
        ("empty", &b""[..], &b""[..]),
        ("key", b"readcap", &[0x11u8; 32][..]),
    ] {
        let input = HpkeInput {
            sealed: hpke::seal(hpke_receiver().public(), HPKE_INFO, aad, plaintext)?,
            aad: aad.to_vec(),
        };
        let receiver = hpke_receiver();
        let opened = hpke::open::<CryptoError>(
            receiver.public(),
            |enc: &EncryptionPublicKey| receiver.diffie_hellman(enc),
            &input.sealed,
            HPKE_INFO,
            &input.aad,
        )?;
        assert_eq!(opened.as_slice(), plaintext);
        seeds.write("hpke_sealed", name, &postcard::to_allocvec(&input)?)?;
    }

    println!("seeds written to {}", seeds.root.display());
    Ok(())
}
