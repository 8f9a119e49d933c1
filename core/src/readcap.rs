//! Readcaps and the key tables of a file's metadata.
//!
//! A file's contents are encrypted under *epoch keys*; each epoch key is wrapped
//! under the *file key*, and the file key is wrapped twice over:
//!
//! - **readcaps**: with HPKE to each principal allowed to read it. An entry's key
//!   is `hash id || HMAC(salt, principal's public key)`, so the table, stored in
//!   plaintext, does not say who can read, yet a reader finds its own entry.
//! - **parent keys**: under the file key of each directory that links to it, keyed
//!   by `HMAC(salt, parent generation || parent inode)`. A readcap on a directory
//!   thus opens its whole subtree with symmetric keys only.
//!
//! Every wrap binds the file's (generation, inode) as AAD, so an entry copied
//! into another file's table does not open.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

use crate::aead::SymmetricKey;
use crate::credstore::{CredStore, CredStoreError};
use crate::hash::{Digest, HashAlgorithm};
use crate::hpke::{self, HpkeSealed};
use crate::keys::{CryptoError, EncryptionPublicKey};

const READCAP_INFO: &[u8] = b"blocktree readcap v1";
/// Length of a file's salt.
pub const SALT_LEN: usize = 32;

/// A file's identity, bound into every key it wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIds {
    /// The generation that stores the file.
    pub generation: u64,
    /// The file's inode in that generation.
    pub inode: u64,
}

impl FileIds {
    fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.generation.to_be_bytes());
        out[8..].copy_from_slice(&self.inode.to_be_bytes());
        out
    }

    fn aad(self, purpose: &[u8]) -> Vec<u8> {
        let mut aad = purpose.to_vec();
        aad.extend_from_slice(&self.to_bytes());
        aad
    }
}

/// Why a key could not be unwrapped.
#[derive(Debug, Error)]
pub enum ReadcapError {
    /// No readcap entry belongs to the principal.
    #[error("no readcap for this principal")]
    NoReadcap,
    /// No parent-key entry for the given directory.
    #[error("no parent key entry for that directory")]
    NoParentEntry,
    /// No wrapped key for the epoch.
    #[error("no key for epoch {0}")]
    NoEpoch(u32),
    /// A wrapped key that does not open: tampered, or moved from another file.
    #[error("wrapped key did not open: {0}")]
    Crypto(#[from] CryptoError),
    /// The credential store failed.
    #[error(transparent)]
    Store(#[from] CredStoreError),
}

/// The key of a readcap table entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadcapId {
    /// The HMAC's hash function.
    pub algorithm: HashAlgorithm,
    /// HMAC(salt, principal's encryption public key).
    pub mac: Digest,
}

impl ReadcapId {
    fn compute(algorithm: HashAlgorithm, salt: &[u8], reader: &EncryptionPublicKey) -> ReadcapId {
        ReadcapId {
            algorithm,
            mac: algorithm.hmac(salt, &[reader.as_sec1()]),
        }
    }
}

/// The file key wrapped for each principal who may read the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadcapTable {
    entries: Vec<(ReadcapId, HpkeSealed)>,
}

impl ReadcapTable {
    /// Number of readcaps.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nobody holds a readcap.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Grants `reader` a readcap for `file_key`, replacing one it already had.
    pub fn grant(
        &mut self,
        algorithm: HashAlgorithm,
        salt: &[u8],
        file: FileIds,
        reader: &EncryptionPublicKey,
        file_key: &SymmetricKey,
    ) -> Result<(), CryptoError> {
        let id = ReadcapId::compute(algorithm, salt, reader);
        let sealed = hpke::seal(
            reader,
            READCAP_INFO,
            &file.aad(b"readcap"),
            file_key.as_bytes(),
        )?;
        self.entries.retain(|(existing, _)| *existing != id);
        self.entries.push((id, sealed));
        Ok(())
    }

    /// The entry that belongs to `reader`, if any.
    pub fn find(&self, salt: &[u8], reader: &EncryptionPublicKey) -> Option<&HpkeSealed> {
        self.entries
            .iter()
            .find(|(id, _)| *id == ReadcapId::compute(id.algorithm, salt, reader))
            .map(|(_, sealed)| sealed)
    }

    /// True if `reader` holds a readcap.
    pub fn allows(&self, salt: &[u8], reader: &EncryptionPublicKey) -> bool {
        self.find(salt, reader).is_some()
    }

    /// Opens the file key with the credentials in `store`.
    pub fn open(
        &self,
        salt: &[u8],
        file: FileIds,
        store: &dyn CredStore,
    ) -> Result<SymmetricKey, ReadcapError> {
        let sealed = self
            .find(salt, &store.encryption_public_key())
            .ok_or(ReadcapError::NoReadcap)?;
        // A ciphertext that does not open is the entry's fault (tampered, or moved
        // from another file), not the store's: report it as such.
        let key = store
            .hpke_open(sealed, READCAP_INFO, &file.aad(b"readcap"))
            .map_err(|error| match error {
                CredStoreError::Crypto(inner) => ReadcapError::Crypto(inner),
                other => ReadcapError::Store(other),
            })?;
        SymmetricKey::from_slice(&key).ok_or(ReadcapError::Crypto(CryptoError::DecryptFailed))
    }
}

/// The file key wrapped under the file key of each parent directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentTable {
    entries: Vec<(Digest, serde_bytes::ByteBuf)>,
}

fn parent_id(salt: &[u8], parent: FileIds) -> Digest {
    HashAlgorithm::Sha256.hmac(salt, &[&parent.to_bytes()])
}

impl ParentTable {
    /// Number of parents.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no parent can open the file.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Wraps `file_key` under `parent_key`, replacing an entry for the same parent.
    pub fn grant(
        &mut self,
        salt: &[u8],
        file: FileIds,
        parent: FileIds,
        parent_key: &SymmetricKey,
        file_key: &SymmetricKey,
    ) -> Result<(), CryptoError> {
        let id = parent_id(salt, parent);
        let wrapped = parent_key.seal(&file.aad(b"parent"), file_key.as_bytes())?;
        self.entries.retain(|(existing, _)| *existing != id);
        self.entries.push((id, serde_bytes::ByteBuf::from(wrapped)));
        Ok(())
    }

    /// Removes the entry of `parent` (after unlink or rename); true if one existed.
    pub fn remove(&mut self, salt: &[u8], parent: FileIds) -> bool {
        let id = parent_id(salt, parent);
        let before = self.entries.len();
        self.entries.retain(|(existing, _)| *existing != id);
        before != self.entries.len()
    }

    /// True if `parent` has an entry: the file is a child of that directory.
    pub fn has_parent(&self, salt: &[u8], parent: FileIds) -> bool {
        let id = parent_id(salt, parent);
        self.entries.iter().any(|(existing, _)| *existing == id)
    }

    /// Opens the file key with the key of `parent`.
    pub fn open(
        &self,
        salt: &[u8],
        file: FileIds,
        parent: FileIds,
        parent_key: &SymmetricKey,
    ) -> Result<SymmetricKey, ReadcapError> {
        let id = parent_id(salt, parent);
        let (_, wrapped) = self
            .entries
            .iter()
            .find(|(existing, _)| *existing == id)
            .ok_or(ReadcapError::NoParentEntry)?;
        let key = parent_key.open(&file.aad(b"parent"), wrapped)?;
        SymmetricKey::from_slice(&key).ok_or(ReadcapError::Crypto(CryptoError::DecryptFailed))
    }
}

/// The epoch keys of a file, each wrapped under its file key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochKeyTable {
    entries: BTreeMap<u32, serde_bytes::ByteBuf>,
}

impl EpochKeyTable {
    /// The newest epoch, if any.
    pub fn current(&self) -> Option<u32> {
        self.entries.keys().next_back().copied()
    }

    /// Generates the key of `epoch` and stores it wrapped under `file_key`.
    pub fn add_epoch(
        &mut self,
        file: FileIds,
        epoch: u32,
        file_key: &SymmetricKey,
    ) -> Result<SymmetricKey, CryptoError> {
        let key = SymmetricKey::generate()?;
        let mut aad = file.aad(b"epoch");
        aad.extend_from_slice(&epoch.to_be_bytes());
        let wrapped = file_key.seal(&aad, key.as_bytes())?;
        self.entries
            .insert(epoch, serde_bytes::ByteBuf::from(wrapped));
        Ok(key)
    }

    /// Unwraps every epoch key.
    pub fn open_all(
        &self,
        file: FileIds,
        file_key: &SymmetricKey,
    ) -> Result<BTreeMap<u32, SymmetricKey>, ReadcapError> {
        self.entries
            .iter()
            .map(|(epoch, wrapped)| {
                let mut aad = file.aad(b"epoch");
                aad.extend_from_slice(&epoch.to_be_bytes());
                let key = file_key.open(&aad, wrapped)?;
                let key = SymmetricKey::from_slice(&key).ok_or(CryptoError::DecryptFailed)?;
                Ok((*epoch, key))
            })
            .collect()
    }
}
