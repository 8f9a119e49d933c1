//! Fixed inputs shared by the fuzz targets and `make-seeds`: the verifier's clock,
//! keys and ids. Every key here is deterministic, so the seeds `make-seeds` writes
//! open and verify in the targets, and a crash found in one run reproduces in the
//! next.

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::sync::OnceLock;

use blocktree_core::BtPath;
use blocktree_core::aead::SymmetricKey;
use blocktree_core::encoding::{self, Encodable};
use blocktree_core::hpke::{self, HpkeSealed};
use blocktree_core::keys::EncryptionKeyPair;
use blocktree_core::principal::PrincipalId;
use blocktree_core::readcap::FileIds;
use blocktree_core::sector::{SectorId, SectorKind, SectorOpener};
use blocktree_core::time::Timestamp;
use serde::{Deserialize, Serialize};

/// The verifier's clock in every target (2025-06-15T15:06:40Z).
pub const NOW: Timestamp = Timestamp(1_750_000_000);
/// The expiry of the writecaps in the seeds (2096), after [`NOW`].
pub const SEED_EXPIRES: Timestamp = Timestamp(4_000_000_000);

/// The key epoch of [`epoch_key`].
pub const EPOCH: u32 = 1;
/// The sector the `sector_record` target opens records as.
pub const SECTOR: SectorId = SectorId {
    generation: 1,
    inode: 2,
    sector: SectorKind::Data(3),
};
/// The parent directory the `metadata` target opens a file's key through.
pub const PARENT: FileIds = FileIds {
    generation: 1,
    inode: 1,
};
/// The HPKE `info` of the `hpke_sealed` target.
pub const HPKE_INFO: &[u8] = b"blocktree fuzz hpke v1";

/// The epoch key sectors are sealed under.
pub fn epoch_key() -> SymmetricKey {
    fixed_key(0x42)
}

/// The file key of the seed metadata: wraps its epoch keys.
pub fn file_key() -> SymmetricKey {
    fixed_key(0x17)
}

/// The key of [`PARENT`]: wraps the seed metadata's file key.
pub fn parent_key() -> SymmetricKey {
    fixed_key(0x5a)
}

fn fixed_key(byte: u8) -> SymmetricKey {
    match SymmetricKey::from_slice(&[byte; 32]) {
        Some(key) => key,
        None => unreachable!("32 bytes is a key"),
    }
}

/// An opener holding [`epoch_key`] for [`EPOCH`], built once.
pub fn sector_opener() -> &'static SectorOpener {
    static OPENER: OnceLock<SectorOpener> = OnceLock::new();
    OPENER.get_or_init(|| {
        let mut opener = SectorOpener::new();
        opener
            .add_epoch(EPOCH, &epoch_key())
            .expect("adding a fixed epoch key");
        opener
    })
}

/// [`epoch_key`] as the epoch-key map metadata secrets are opened with.
pub fn epoch_keys() -> &'static BTreeMap<u32, SymmetricKey> {
    static KEYS: OnceLock<BTreeMap<u32, SymmetricKey>> = OnceLock::new();
    KEYS.get_or_init(|| BTreeMap::from([(EPOCH, epoch_key())]))
}

/// The HPKE receiver of the `hpke_sealed` target, derived once from a fixed seed
/// (RFC 9180 DeriveKeyPair) rather than generated, so seeds stay valid.
pub fn hpke_receiver() -> &'static EncryptionKeyPair {
    static RECEIVER: OnceLock<EncryptionKeyPair> = OnceLock::new();
    RECEIVER.get_or_init(|| {
        hpke::derive_key_pair(b"blocktree fuzz hpke receiver").expect("deriving a fixed key pair")
    })
}

/// The input of the `hpke_sealed` target: a ciphertext and the AAD to open it with.
#[derive(Debug, Serialize, Deserialize)]
pub struct HpkeInput {
    /// What a credential store is asked to open.
    pub sealed: HpkeSealed,
    /// The object the ciphertext is bound to.
    #[serde(with = "serde_bytes")]
    pub aad: Vec<u8>,
}

/// A valid path, for checks that need one when the input names none.
pub fn fixed_path() -> BtPath {
    BtPath::root_of(PrincipalId::from_bytes([7; 32]))
}

/// Asserts that `value` survives encode → decode unchanged.
pub fn assert_round_trip<T: Encodable + PartialEq + Debug>(value: &T) {
    let encoded = encoding::encode(value);
    match encoding::decode::<T>(&encoded) {
        Ok(decoded) => assert_eq!(&decoded, value, "decode(encode(x)) != x"),
        Err(error) => panic!("re-encoded {:?} does not decode: {error}", T::KIND),
    }
}

/// Renders `result`'s error as a user would see it: error messages must not panic
/// either.
pub fn show<T, E: Display + Debug>(result: &Result<T, E>) {
    if let Err(error) = result {
        let _ = format!("{error} {error:?}");
    }
}
