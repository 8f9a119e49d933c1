//! The generation's superblock: its number, the salt of on-disk keys, and the
//! next free inode.
//!
//! The original design keeps the superblock as inode 2 of the generation. It
//! cannot be stored under a salted key, since the salt is in it, so here it is a
//! small file of its own, replaced atomically and checked with a CRC.

use std::fs;
use std::path::Path;

use crate::error::EngineError;

const MAGIC: [u8; 8] = *b"BTSUPER1";
const LEN: usize = 8 + 8 + 32 + 8 + 4;
/// The file name of the superblock inside the store directory.
pub const FILE_NAME: &str = "superblock";
/// Inodes below this are reserved (2 is the superblock in the original design).
pub const FIRST_INODE: u64 = 3;

/// The decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// The generation this store holds.
    pub generation: u64,
    /// Salt of the on-disk key hash.
    pub salt: [u8; 32],
    /// The next inode to hand out.
    pub next_inode: u64,
}

impl Superblock {
    /// A new superblock with a random salt.
    pub fn new(generation: u64) -> Result<Superblock, EngineError> {
        let mut salt = [0u8; 32];
        blocktree_core::aead::random_fill(&mut salt)
            .map_err(|error| EngineError::Config(format!("salt: {error}")))?;
        Ok(Superblock {
            generation,
            salt,
            next_inode: FIRST_INODE,
        })
    }

    /// The 60-byte on-disk form.
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..16].copy_from_slice(&self.generation.to_le_bytes());
        out[16..48].copy_from_slice(&self.salt);
        out[48..56].copy_from_slice(&self.next_inode.to_le_bytes());
        let crc = crc32c::crc32c(&out[..56]);
        out[56..60].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a superblock, checking its magic and CRC.
    pub fn decode(bytes: &[u8]) -> Result<Superblock, String> {
        if bytes.len() != LEN {
            return Err(format!("{} bytes, expected {LEN}", bytes.len()));
        }
        if bytes[..8] != MAGIC {
            return Err("not a Blocktree superblock".into());
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[56..60]);
        if crc32c::crc32c(&bytes[..56]) != u32::from_le_bytes(crc) {
            return Err("checksum mismatch".into());
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[8..16]);
        let generation = u64::from_le_bytes(word);
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&bytes[16..48]);
        word.copy_from_slice(&bytes[48..56]);
        Ok(Superblock {
            generation,
            salt,
            next_inode: u64::from_le_bytes(word),
        })
    }

    /// Reads the superblock of the store in `dir`; `None` if there is none.
    pub fn load(dir: &Path) -> Result<Option<Superblock>, EngineError> {
        let path = dir.join(FILE_NAME);
        match fs::read(&path) {
            Ok(bytes) => Superblock::decode(&bytes)
                .map(Some)
                .map_err(|reason| EngineError::Damaged { path, reason }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(EngineError::io("reading", path)(error)),
        }
    }

    /// Replaces the superblock of the store in `dir` atomically and durably.
    pub fn store(&self, dir: &Path) -> Result<(), EngineError> {
        crate::durable::write_durably(&dir.join(FILE_NAME), &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Superblock::load(dir.path()).unwrap(), None);
        let superblock = Superblock::new(9).unwrap();
        superblock.store(dir.path()).unwrap();
        assert_eq!(
            Superblock::load(dir.path()).unwrap(),
            Some(superblock.clone())
        );
        let mut bytes = superblock.encode();
        bytes[20] ^= 1;
        assert!(Superblock::decode(&bytes).is_err());
    }
}
