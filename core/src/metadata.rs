//! The metadata sector of a file: what it is, who wrote it, how to read it.
//!
//! Metadata has a plaintext part, which a storage server needs to verify writes
//! and route reads (ids, sector size, hash algorithm, Merkle root, writecap, key
//! tables, salt, key epoch), and a secret part (ownership, mode, size, times,
//! extended attributes, cache lifetime) that is sealed under the file's current
//! epoch key when the file is encrypted. The writer's signature covers every
//! field of both, so nothing in the metadata can change without the writecap
//! holder's key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

use crate::aead::SymmetricKey;
use crate::encoding::{self, DecodeError, Encodable, Kind};
use crate::hash::{Digest, HashAlgorithm};
use crate::keys::{CryptoError, Signature, Signer, SigningPublicKey};
use crate::path::BtPath;
use crate::readcap::{EpochKeyTable, FileIds, ParentTable, ReadcapTable, SALT_LEN};
use crate::sector::{EPOCH_SEAL_LIMIT, SealError, SectorSealer};
use crate::time::Timestamp;
use crate::writecap::{RevocationList, Writecap, WritecapError};

const SIGNING_CONTEXT: &[u8] = b"blocktree file metadata v1\0";
const SECRETS_AAD: &[u8] = b"blocktree metadata secrets v1";

/// An instant with nanosecond precision, as POSIX file times need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileTime {
    /// Seconds since the Unix epoch (negative before it).
    pub seconds: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

/// The secret part of the metadata: POSIX attributes and cache control.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaSecrets {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// File type and permission bits, as in `st_mode`.
    pub mode: u32,
    /// Length in bytes.
    pub size: u64,
    /// Directory entries naming the file (hard links); a directory counts its
    /// subdirectories' `..` as POSIX does.
    pub nlink: u32,
    /// Last access.
    pub atime: FileTime,
    /// Last content change.
    pub mtime: FileTime,
    /// Last metadata change.
    pub ctime: FileTime,
    /// Extended attributes, name to value.
    pub xattrs: BTreeMap<serde_bytes::ByteBuf, serde_bytes::ByteBuf>,
    /// How long a reader may cache this file's sectors.
    pub cache_seconds: u32,
}

impl Encodable for MetaSecrets {
    const KIND: Kind = Kind::MetaSecrets;
}

/// The secret part as stored: sealed under an epoch key, or in the clear for an
/// unencrypted file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretsPart {
    /// An unencrypted file's attributes.
    Clear(MetaSecrets),
    /// An encrypted file's attributes: the epoch and the sealed encoding.
    Sealed {
        /// The epoch whose key sealed them.
        epoch: u32,
        /// nonce || ciphertext || tag.
        sealed: serde_bytes::ByteBuf,
    },
}

/// Encryption state of an encrypted file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// The epoch whose key seals new sectors.
    pub epoch: u32,
    /// Records sealed under that epoch so far (nonce accounting).
    pub seals_in_epoch: u64,
    /// Every epoch key, wrapped under the file key.
    pub epoch_keys: EpochKeyTable,
}

/// Everything the signature covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaBody {
    /// Where the file lives.
    pub ids: FileIds,
    /// Data sector size, fixed at creation.
    pub sector_size: u32,
    /// The Merkle tree's hash, fixed at creation.
    pub hash_algorithm: HashAlgorithm,
    /// The root of the Merkle tree over the data sectors.
    pub merkle_root: Digest,
    /// How many data sectors the file has (the tree's leaf count, holes included):
    /// in the clear so a store knows how many Merkle pieces to keep.
    pub sector_count: u64,
    /// The key that signs this metadata; its principal holds `writecap`.
    pub writer: SigningPublicKey,
    /// The writer's authority.
    pub writecap: Writecap,
    /// The file key wrapped for readers.
    pub readcaps: ReadcapTable,
    /// The file key wrapped under each parent directory's key.
    pub parents: ParentTable,
    /// Keys the readcap and parent tables' HMACs.
    pub salt: [u8; SALT_LEN],
    /// `None` for an unencrypted file.
    pub keys: Option<KeyState>,
    /// Ownership, mode, size, times, xattrs.
    pub secrets: SecretsPart,
}

/// A signed metadata sector.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileMeta {
    body: MetaBody,
    signature: Signature,
    /// Made by [`FileMeta::sign`] in this process with a signer whose
    /// signatures verify by construction ([`Signer::signs_in_process`]): the
    /// checks below skip the ECDSA verification of this signature, which would
    /// repeat the arithmetic of one made microseconds before over these very
    /// bytes (the fields are private and never change after signing). Never
    /// encoded: metadata decoded from a disk or a socket is always verified.
    #[serde(skip)]
    signed_here: bool,
}

/// Equal metadata: the same body and signature, wherever it was made.
impl PartialEq for FileMeta {
    fn eq(&self, other: &FileMeta) -> bool {
        self.body == other.body && self.signature == other.signature
    }
}

impl Eq for FileMeta {}

impl Encodable for FileMeta {
    const KIND: Kind = Kind::FileMeta;
}

/// Why metadata is not acceptable.
#[derive(Debug, Error)]
pub enum MetaError {
    /// The writer's writecap does not authorize this write.
    #[error("writecap: {0}")]
    Writecap(#[from] WritecapError),
    /// The signature does not verify with the writer's key.
    #[error("metadata signature does not verify")]
    BadSignature,
    /// The signer is not the principal the writecap was issued to.
    #[error("the signer is not the writecap's subject")]
    SignerNotSubject,
    /// The secret part could not be opened.
    #[error("metadata secrets: {0}")]
    Secrets(#[from] CryptoError),
    /// The epoch that sealed the secrets has no key.
    #[error("no key for epoch {0}")]
    NoEpochKey(u32),
    /// The secrets are sealed, but no keys were given (or the reverse).
    #[error("the file is {0}encrypted")]
    EncryptionMismatch(&'static str),
    /// Sealing failed (epoch exhausted, RNG).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The secret part does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

fn signed_bytes(body: &MetaBody) -> Vec<u8> {
    match postcard::to_extend(body, SIGNING_CONTEXT.to_vec()) {
        Ok(bytes) => bytes,
        Err(error) => unreachable!("serializing metadata failed: {error}"),
    }
}

impl MetaBody {
    /// Seals `secrets` under the current epoch key (counting the nonce against
    /// `sealer`), or stores them in the clear for an unencrypted file.
    pub fn set_secrets(
        &mut self,
        secrets: &MetaSecrets,
        sealer: Option<(&SectorSealer, &SymmetricKey)>,
    ) -> Result<(), MetaError> {
        self.secrets = match (&mut self.keys, sealer) {
            (None, None) => SecretsPart::Clear(secrets.clone()),
            (Some(state), Some((sealer, epoch_key))) => {
                sealer.reserve()?;
                state.seals_in_epoch = sealer.seals().min(EPOCH_SEAL_LIMIT);
                let sealed = epoch_key.seal(&self.ids_aad(), &encoding::encode(secrets))?;
                SecretsPart::Sealed {
                    epoch: sealer.epoch(),
                    sealed: serde_bytes::ByteBuf::from(sealed),
                }
            }
            (None, Some(_)) => return Err(MetaError::EncryptionMismatch("not ")),
            (Some(_), None) => return Err(MetaError::EncryptionMismatch("")),
        };
        Ok(())
    }

    /// The secret part, opened with the file's epoch keys when it is sealed.
    pub fn secrets(
        &self,
        epoch_keys: Option<&BTreeMap<u32, SymmetricKey>>,
    ) -> Result<MetaSecrets, MetaError> {
        match (&self.secrets, epoch_keys) {
            (SecretsPart::Clear(secrets), _) => Ok(secrets.clone()),
            (SecretsPart::Sealed { epoch, sealed }, Some(keys)) => {
                let key = keys.get(epoch).ok_or(MetaError::NoEpochKey(*epoch))?;
                let plaintext = key.open(&self.ids_aad(), sealed)?;
                Ok(encoding::decode(&plaintext)?)
            }
            (SecretsPart::Sealed { .. }, None) => Err(MetaError::EncryptionMismatch("")),
        }
    }

    fn ids_aad(&self) -> Vec<u8> {
        let mut aad = SECRETS_AAD.to_vec();
        aad.extend_from_slice(&self.ids.generation.to_be_bytes());
        aad.extend_from_slice(&self.ids.inode.to_be_bytes());
        aad
    }
}

/// Signatures that verified before: writecap chains (by their encoding) and
/// whole metadata (by a digest of its signed bytes and signature). A writer
/// signs many files under one writecap, so its chain needs checking once; and
/// metadata read again unchanged (a file system reloading a node it dropped
/// from its cache) needs no signature check at all. Each check saved is an
/// ECDSA verification, about 50 µs. What changes with time (expiry,
/// revocation) is checked every time. Bounded: each set keeps the most recently
/// used entries, up to its capacity.
pub struct VerifiedSignatures {
    chains: std::sync::Mutex<Recent>,
    metas: std::sync::Mutex<Recent>,
}

/// A bounded set that forgets its least recently used half at a time: two
/// generations of at most half the capacity each; a hit in the older one moves
/// the entry to the newer, and a full newer generation replaces the older.
struct Recent {
    newer: std::collections::HashSet<Vec<u8>>,
    older: std::collections::HashSet<Vec<u8>>,
    half: usize,
}

impl Recent {
    fn new(capacity: usize) -> Recent {
        Recent {
            newer: std::collections::HashSet::new(),
            older: std::collections::HashSet::new(),
            half: (capacity / 2).max(1),
        }
    }

    fn contains(&mut self, item: &[u8]) -> bool {
        if self.newer.contains(item) {
            return true;
        }
        match self.older.take(item) {
            Some(item) => {
                self.insert(item);
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, item: Vec<u8>) {
        if self.newer.len() >= self.half {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(item);
    }
}

impl VerifiedSignatures {
    /// Remembers at most `chains` writecap chains and `metas` metadata.
    pub fn new(chains: usize, metas: usize) -> VerifiedSignatures {
        VerifiedSignatures {
            chains: std::sync::Mutex::new(Recent::new(chains)),
            metas: std::sync::Mutex::new(Recent::new(metas)),
        }
    }

    fn knows(set: &std::sync::Mutex<Recent>, item: &[u8]) -> bool {
        set.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(item)
    }

    fn remember(set: &std::sync::Mutex<Recent>, item: Vec<u8>) {
        set.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(item);
    }
}

impl FileMeta {
    /// Signs `body` with `signer`, which must be the writecap's subject; sets
    /// `body.writer` to the signer's key.
    pub fn sign(mut body: MetaBody, signer: &dyn Signer) -> Result<FileMeta, MetaError> {
        if body.writecap.subject() != Some(signer.principal()) {
            return Err(MetaError::SignerNotSubject);
        }
        body.writer = signer.public_key();
        let signature = signer.sign(&signed_bytes(&body))?;
        Ok(FileMeta {
            body,
            signature,
            signed_here: signer.signs_in_process(),
        })
    }

    /// Checks the writer's signature over `signed` (this metadata's signed
    /// bytes), unless this process made it with an in-process key.
    fn check_signature(&self, signed: &[u8]) -> Result<(), MetaError> {
        if self.signed_here {
            return Ok(());
        }
        self.body
            .writer
            .verify(signed, &self.signature)
            .map_err(|_| MetaError::BadSignature)
    }

    /// Checks the writer's authority over `directory` (the path the file's
    /// generation serves) and the signature over every field.
    pub fn verify(
        &self,
        directory: &BtPath,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<(), MetaError> {
        self.body
            .writecap
            .validate_for(&self.body.writer.principal(), directory, now, revoked)?;
        self.check_signature(&signed_bytes(&self.body))
    }

    /// Checks only the writer's signature over every field: for metadata
    /// whose writer's authority was checked when it was stored (a scrub
    /// looking for sectors damaged since, where an expired writecap is no
    /// damage).
    pub fn verify_signature(&self) -> Result<(), MetaError> {
        self.body
            .writer
            .verify(&signed_bytes(&self.body), &self.signature)
            .map_err(|_| MetaError::BadSignature)
    }

    /// [`FileMeta::verify`] for metadata whose writecap chain is byte-identical to
    /// one whose certificate signatures were verified before: everything else,
    /// the metadata's own signature included, is checked.
    pub fn verify_known_chain(
        &self,
        directory: &BtPath,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<(), MetaError> {
        self.body.writecap.validate_for_known_signatures(
            &self.body.writer.principal(),
            directory,
            now,
            revoked,
        )?;
        self.check_signature(&signed_bytes(&self.body))
    }

    /// [`FileMeta::verify`], skipping the signature checks `cache` saw succeed
    /// before: all of them for metadata byte-identical to metadata that
    /// verified, the certificates' for a chain that verified. Expiry,
    /// revocation and the subject are checked every time; what verifies is
    /// remembered.
    pub fn verify_cached(
        &self,
        cache: &VerifiedSignatures,
        directory: &BtPath,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<(), MetaError> {
        let signed = signed_bytes(&self.body);
        let digest = self.cache_digest(&signed);
        let writer = self.body.writer.principal();
        if VerifiedSignatures::knows(&cache.metas, &digest) {
            self.body
                .writecap
                .validate_for_known_signatures(&writer, directory, now, revoked)?;
            return Ok(());
        }
        let chain = encoding::encode(&self.body.writecap);
        let chain_known = VerifiedSignatures::knows(&cache.chains, &chain);
        if chain_known {
            self.body
                .writecap
                .validate_for_known_signatures(&writer, directory, now, revoked)?;
        } else {
            self.body
                .writecap
                .validate_for(&writer, directory, now, revoked)?;
        }
        self.check_signature(&signed)?;
        if !chain_known {
            VerifiedSignatures::remember(&cache.chains, chain);
        }
        VerifiedSignatures::remember(&cache.metas, digest);
        Ok(())
    }

    /// Remembers in `cache` that this metadata's signatures verified, without
    /// checking them: only for metadata a verifier has just accepted (the sector
    /// service took the batch that carried it), so that reading it back costs
    /// [`verify_cached`](Self::verify_cached) no signature check. Expiry,
    /// revocation and the subject are still checked on every read.
    pub fn remember_accepted(&self, cache: &VerifiedSignatures) {
        let digest = self.cache_digest(&signed_bytes(&self.body));
        VerifiedSignatures::remember(&cache.metas, digest);
    }

    /// What [`VerifiedSignatures`] remembers metadata by: a digest of its signed
    /// bytes and its signature.
    fn cache_digest(&self, signed: &[u8]) -> Vec<u8> {
        HashAlgorithm::Sha256
            .hash(&[signed, self.signature.as_bytes()])
            .as_bytes()
            .to_vec()
    }

    /// The signed fields. Trust them only after [`FileMeta::verify`].
    pub fn body(&self) -> &MetaBody {
        &self.body
    }

    /// Takes the body out to modify it and sign it again.
    pub fn into_body(self) -> MetaBody {
        self.body
    }

    /// The writer's signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }
}

#[cfg(test)]
mod tests {
    use super::Recent;

    #[test]
    fn recent_forgets_the_least_recently_used_half() {
        let mut recent = Recent::new(4);
        for item in [b"a", b"b", b"c"] {
            recent.insert(item.to_vec());
        }
        // "a" and "b" moved to the older half when "c" came; a hit on "a" brings
        // it back, so the next turnover forgets "b" and keeps "a".
        assert!(recent.contains(b"a"));
        recent.insert(b"d".to_vec());
        assert!(recent.contains(b"a"));
        assert!(recent.contains(b"c"));
        assert!(recent.contains(b"d"));
        assert!(!recent.contains(b"b"));
        assert!(recent.newer.len() + recent.older.len() <= 4);
    }
}
