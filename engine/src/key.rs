//! On-disk keys: the salted hash of a sector id, and which shard owns it.
//!
//! Nothing on disk names a record's inode or sector index: the key is the first
//! 16 bytes of SHA-256(salt || sector id), with the salt kept in the superblock.
//! 128 bits make an accidental collision among even 2^40 sectors negligible.

use blocktree_core::hash::HashAlgorithm;
use blocktree_core::sector::SectorId;

use crate::record::Key;

/// Derives on-disk keys for one generation.
#[derive(Clone)]
pub struct KeyDeriver {
    salt: [u8; 32],
}

impl KeyDeriver {
    /// A deriver with the generation's salt.
    pub fn new(salt: [u8; 32]) -> KeyDeriver {
        KeyDeriver { salt }
    }

    /// The store's log id, stamped in every chunk header (see [`crate::record`]).
    pub fn log_id(&self) -> u64 {
        let digest = HashAlgorithm::Sha256.hash(&[b"blocktree log id\0", &self.salt]);
        let mut word = [0u8; 8];
        word.copy_from_slice(&digest.as_bytes()[..8]);
        u64::from_le_bytes(word)
    }

    /// The key of `id`.
    pub fn key(&self, id: &SectorId) -> Key {
        let digest = HashAlgorithm::Sha256.hash(&[&self.salt, &id.to_bytes()]);
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest.as_bytes()[..16]);
        key
    }
}

/// The shard that owns `key` among `shards` shards.
pub fn shard_of(key: &Key, shards: usize) -> usize {
    let mut word = [0u8; 8];
    word.copy_from_slice(&key[8..16]);
    (u64::from_le_bytes(word) % shards as u64) as usize
}
