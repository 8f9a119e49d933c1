//! Sector identities and AES-256-GCM sector sealing (DESIGN decision 2).
//!
//! A sealed data sector is one self-contained record:
//!
//! ```text
//! [version 1][key epoch u32 LE][nonce 12][ciphertext, as long as the plaintext][tag 16]
//! ```
//!
//! Each record carries its own random nonce, so rewriting a sector never reuses a
//! nonce; the [`SectorId`] is the AAD, so a record cannot be replayed at another
//! file or offset. Random 96-bit nonces are safe for 2^32 seals under one key, so
//! a [`SectorSealer`] refuses to go past [`EPOCH_SEAL_LIMIT`] and the file moves to
//! a new epoch key. The Merkle leaf covers the whole record.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

use crate::aead::{SymmetricKey, TAG_LEN, random_fill};

/// Which sector of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SectorKind {
    /// The metadata sector.
    Meta,
    /// Piece `k` of the Merkle sector: the leaf digests of data sectors
    /// `k * n .. (k + 1) * n`, with n = [`MERKLE_PIECE_BYTES`] / digest length. The
    /// sector is split so that a batch rewrites only the pieces it changed and no
    /// piece outgrows one engine record.
    Merkle(u64),
    /// The data sector with this 0-based index.
    Data(u64),
}

/// A sector's identity: its generation, inode and place in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SectorId {
    /// The sector service cluster that stores the file.
    pub generation: u64,
    /// The file within the generation.
    pub inode: u64,
    /// The sector within the file.
    pub sector: SectorKind,
}

/// The size of a full Merkle piece: 128 SHA-256 or 64 SHA-512 leaf digests, so
/// rewriting the piece of a changed 4 KiB sector costs no more than the sector.
pub const MERKLE_PIECE_BYTES: usize = 4096;

/// Length of [`SectorId::to_bytes`].
pub const SECTOR_ID_LEN: usize = 25;

impl SectorId {
    /// A fixed-width, unambiguous encoding, used as AAD and as input to the
    /// engine's salted on-disk key.
    pub fn to_bytes(&self) -> [u8; SECTOR_ID_LEN] {
        let (tag, index) = match self.sector {
            SectorKind::Meta => (0u8, 0u64),
            SectorKind::Merkle(piece) => (1, piece),
            SectorKind::Data(index) => (2, index),
        };
        let mut out = [0u8; SECTOR_ID_LEN];
        out[..8].copy_from_slice(&self.generation.to_be_bytes());
        out[8..16].copy_from_slice(&self.inode.to_be_bytes());
        out[16] = tag;
        out[17..].copy_from_slice(&index.to_be_bytes());
        out
    }
}

/// The record format version.
pub const RECORD_VERSION: u8 = 1;
/// Bytes before the ciphertext.
pub const RECORD_HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
/// Bytes a sealed record adds to its plaintext.
pub const RECORD_OVERHEAD: usize = RECORD_HEADER_LEN + TAG_LEN;
/// Seals allowed under one epoch key: a quarter of the 2^32 random-nonce bound.
pub const EPOCH_SEAL_LIMIT: u64 = 1 << 30;

/// Why a sector could not be sealed or opened.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SealError {
    /// The record is shorter than its fixed overhead.
    #[error("sealed record of {0} bytes is shorter than the {RECORD_OVERHEAD}-byte overhead")]
    Truncated(usize),
    /// A record version this build does not read.
    #[error("unsupported sector record version {0}")]
    UnsupportedVersion(u8),
    /// The record names a key epoch the reader has no key for.
    #[error("no key for epoch {0}")]
    UnknownEpoch(u32),
    /// Authentication failed: the record was altered, moved, or sealed by another key.
    #[error("sector {0:?} failed authentication: tampered, misplaced or wrong key")]
    Tampered(SectorId),
    /// The epoch key has sealed [`EPOCH_SEAL_LIMIT`] records; rotate to a new epoch.
    #[error("epoch {0} has reached its seal limit; rotate the file key epoch")]
    EpochExhausted(u32),
    /// An output buffer of the wrong size.
    #[error("output buffer is {actual} bytes, expected {expected}")]
    BufferSize {
        /// What the record needs.
        expected: usize,
        /// What was given.
        actual: usize,
    },
    /// The cipher failed for an internal reason.
    #[error("sector cipher failure")]
    Internal,
}

fn aead_key(key: &SymmetricKey) -> Result<LessSafeKey, SealError> {
    let unbound = UnboundKey::new(&AES_256_GCM, key.as_bytes()).map_err(|_| SealError::Internal)?;
    Ok(LessSafeKey::new(unbound))
}

/// Seals sectors under one epoch key, counting nonces. Shareable across threads.
pub struct SectorSealer {
    epoch: u32,
    key: LessSafeKey,
    seals: AtomicU64,
}

impl SectorSealer {
    /// A sealer for `epoch`, whose key has already sealed `seals_so_far` records
    /// (from the file's metadata).
    pub fn new(
        epoch: u32,
        key: &SymmetricKey,
        seals_so_far: u64,
    ) -> Result<SectorSealer, SealError> {
        Ok(SectorSealer {
            epoch,
            key: aead_key(key)?,
            seals: AtomicU64::new(seals_so_far),
        })
    }

    /// The key epoch this sealer writes.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Records sealed under this epoch so far, to persist in the metadata.
    pub fn seals(&self) -> u64 {
        self.seals.load(Ordering::Relaxed)
    }

    /// Takes one nonce's worth of budget; also used by metadata sealing, which
    /// shares the epoch key.
    pub(crate) fn reserve(&self) -> Result<(), SealError> {
        let previous = self.seals.fetch_add(1, Ordering::Relaxed);
        if previous >= EPOCH_SEAL_LIMIT {
            self.seals.store(EPOCH_SEAL_LIMIT, Ordering::Relaxed);
            return Err(SealError::EpochExhausted(self.epoch));
        }
        Ok(())
    }

    /// Seals `plaintext` as sector `id` into `record`, which must be exactly
    /// `plaintext.len() + RECORD_OVERHEAD` bytes. No intermediate copy.
    pub fn seal(
        &self,
        id: &SectorId,
        plaintext: &[u8],
        record: &mut [u8],
    ) -> Result<(), SealError> {
        let expected = plaintext.len() + RECORD_OVERHEAD;
        if record.len() != expected {
            return Err(SealError::BufferSize {
                expected,
                actual: record.len(),
            });
        }
        self.reserve()?;
        let (header, rest) = record.split_at_mut(RECORD_HEADER_LEN);
        let (ciphertext, tag) = rest.split_at_mut(plaintext.len());
        header[0] = RECORD_VERSION;
        header[1..5].copy_from_slice(&self.epoch.to_le_bytes());
        let nonce = &mut header[5..];
        random_fill(nonce).map_err(|_| SealError::Internal)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Internal)?;
        self.key
            .seal_out_of_place_scatter(
                nonce,
                Aad::from(id.to_bytes()),
                plaintext,
                ciphertext,
                &[],
                tag,
            )
            .map_err(|_| SealError::Internal)
    }

    /// [`SectorSealer::seal`] into a new vector.
    pub fn seal_to_vec(&self, id: &SectorId, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut record = vec![0u8; plaintext.len() + RECORD_OVERHEAD];
        self.seal(id, plaintext, &mut record)?;
        Ok(record)
    }
}

/// Opens sealed sectors of any epoch whose key it holds.
#[derive(Default)]
pub struct SectorOpener {
    keys: BTreeMap<u32, LessSafeKey>,
}

impl SectorOpener {
    /// An opener with no keys.
    pub fn new() -> SectorOpener {
        SectorOpener::default()
    }

    /// Adds the key of `epoch`.
    pub fn add_epoch(&mut self, epoch: u32, key: &SymmetricKey) -> Result<(), SealError> {
        self.keys.insert(epoch, aead_key(key)?);
        Ok(())
    }

    /// The plaintext length of a record of `record_len` bytes.
    pub fn plaintext_len(record_len: usize) -> Result<usize, SealError> {
        record_len
            .checked_sub(RECORD_OVERHEAD)
            .ok_or(SealError::Truncated(record_len))
    }

    /// Authenticates and decrypts `record` (sector `id`) into `plaintext`, which
    /// must be exactly [`SectorOpener::plaintext_len`] bytes.
    pub fn open(
        &self,
        id: &SectorId,
        record: &[u8],
        plaintext: &mut [u8],
    ) -> Result<(), SealError> {
        let expected = Self::plaintext_len(record.len())?;
        if plaintext.len() != expected {
            return Err(SealError::BufferSize {
                expected,
                actual: plaintext.len(),
            });
        }
        let (key, nonce) = self.key_and_nonce(record)?;
        let (ciphertext, tag) = record[RECORD_HEADER_LEN..].split_at(expected);
        key.open_separate_gather(nonce, Aad::from(id.to_bytes()), ciphertext, tag, plaintext)
            .map_err(|_| SealError::Tampered(*id))
    }

    /// The key and nonce a record's header names; the record is at least
    /// [`RECORD_OVERHEAD`] bytes.
    fn key_and_nonce(&self, record: &[u8]) -> Result<(&LessSafeKey, Nonce), SealError> {
        let header = &record[..RECORD_HEADER_LEN];
        if header[0] != RECORD_VERSION {
            return Err(SealError::UnsupportedVersion(header[0]));
        }
        let epoch = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
        let key = self
            .keys
            .get(&epoch)
            .ok_or(SealError::UnknownEpoch(epoch))?;
        let nonce =
            Nonce::try_assume_unique_for_key(&header[5..]).map_err(|_| SealError::Internal)?;
        Ok((key, nonce))
    }

    /// [`SectorOpener::open`] into a new vector.
    pub fn open_to_vec(&self, id: &SectorId, record: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut plaintext = vec![0u8; Self::plaintext_len(record.len())?];
        self.open(id, record, &mut plaintext)?;
        Ok(plaintext)
    }

    /// [`SectorOpener::open`] in the record's own buffer, which becomes the
    /// plaintext: a reader that owns the records it fetched opens each without
    /// allocating (and zeroing) a second buffer. A record that fails to open is
    /// consumed.
    pub fn open_in_place(&self, id: &SectorId, mut record: Vec<u8>) -> Result<Vec<u8>, SealError> {
        let expected = Self::plaintext_len(record.len())?;
        let (key, nonce) = self.key_and_nonce(&record)?;
        let opened = key
            .open_within(
                nonce,
                Aad::from(id.to_bytes()),
                &mut record,
                RECORD_HEADER_LEN..,
            )
            .map_err(|_| SealError::Tampered(*id))?
            .len();
        if opened != expected {
            return Err(SealError::Internal);
        }
        record.truncate(opened);
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: u64) -> SectorId {
        SectorId {
            generation: 1,
            inode: 7,
            sector: SectorKind::Data(index),
        }
    }

    #[test]
    fn round_trip_tamper_and_misplacement() {
        let key = SymmetricKey::generate().unwrap();
        let sealer = SectorSealer::new(3, &key, 0).unwrap();
        let mut opener = SectorOpener::new();
        opener.add_epoch(3, &key).unwrap();
        let plaintext = vec![0x5au8; 4096];
        let record = sealer.seal_to_vec(&id(9), &plaintext).unwrap();
        assert_eq!(opener.open_to_vec(&id(9), &record).unwrap(), plaintext);
        assert_eq!(
            opener.open_in_place(&id(9), record.clone()).unwrap(),
            plaintext
        );
        assert_eq!(
            opener.open_to_vec(&id(10), &record),
            Err(SealError::Tampered(id(10)))
        );
        assert_eq!(
            opener.open_in_place(&id(10), record.clone()),
            Err(SealError::Tampered(id(10)))
        );
        for index in [RECORD_HEADER_LEN, 100, record.len() - 1] {
            let mut tampered = record.clone();
            tampered[index] ^= 1;
            assert_eq!(
                opener.open_to_vec(&id(9), &tampered),
                Err(SealError::Tampered(id(9)))
            );
            assert_eq!(
                opener.open_in_place(&id(9), tampered),
                Err(SealError::Tampered(id(9)))
            );
        }
        for short in [0, RECORD_HEADER_LEN, RECORD_OVERHEAD - 1] {
            assert_eq!(
                opener.open_in_place(&id(9), record[..short].to_vec()),
                Err(SealError::Truncated(short))
            );
        }
        let mut other_epoch = record.clone();
        other_epoch[1] = 4;
        assert_eq!(
            opener.open_to_vec(&id(9), &other_epoch),
            Err(SealError::UnknownEpoch(4))
        );
        assert_eq!(
            opener.open_to_vec(&id(9), &record[..20]),
            Err(SealError::Truncated(20))
        );
    }

    #[test]
    fn rewriting_a_sector_uses_a_fresh_nonce() {
        let key = SymmetricKey::generate().unwrap();
        let sealer = SectorSealer::new(0, &key, 0).unwrap();
        let a = sealer.seal_to_vec(&id(0), b"same").unwrap();
        let b = sealer.seal_to_vec(&id(0), b"same").unwrap();
        assert_ne!(a[5..RECORD_HEADER_LEN], b[5..RECORD_HEADER_LEN]);
        assert_eq!(sealer.seals(), 2);
    }

    #[test]
    fn refuses_to_exceed_the_epoch_limit() {
        let key = SymmetricKey::generate().unwrap();
        let sealer = SectorSealer::new(2, &key, EPOCH_SEAL_LIMIT - 1).unwrap();
        sealer.seal_to_vec(&id(0), b"last").unwrap();
        assert_eq!(
            sealer.seal_to_vec(&id(0), b"one more"),
            Err(SealError::EpochExhausted(2))
        );
    }
}
