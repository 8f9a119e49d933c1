//! Credential stores: keys that sign, unwrap and are never exported.
//!
//! A [`CredStore`] holds a process's runtime credentials (a signing key, an
//! encryption key for readcaps, a storage key for receiving exported root
//! credentials, and the writecap it was issued) and optionally a domain's root
//! credentials, protected by a password. Callers ask it to sign or to open HPKE
//! ciphertexts; private keys stay inside. [`FileCredStore`] keeps them in files;
//! `tpm::TpmCredStore` (feature `tpm`) keeps them in a TPM 2.0.
//!
//! Root credentials move between stores only as an [`ExportedRoot`]: an inner
//! layer of HPKE to the receiving store's storage key, inside an outer layer of
//! AES-256-GCM under a key derived from the root password with Argon2id. Both the
//! password and the receiving store are needed to import them.

mod file;
mod password;
#[cfg(feature = "tpm")]
pub mod tpm;

pub use file::FileCredStore;
pub use password::KdfParams;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::encoding::{DecodeError, Encodable, Kind};
use crate::hpke::HpkeSealed;
use crate::keys::{CryptoError, EncryptionPublicKey, Signature, Signer, SigningPublicKey};
use crate::principal::PrincipalId;
use crate::writecap::{Writecap, WritecapError};

/// Why a credential store operation failed.
#[derive(Debug, Error)]
pub enum CredStoreError {
    /// No store at the given place.
    #[error(
        "no credential store at {0} (create one with `blocktree provision new-runtime --store {0}`)"
    )]
    NotFound(PathBuf),
    /// A store already exists where a new one was to be created.
    #[error("a credential store already exists at {0}")]
    AlreadyExists(PathBuf),
    /// A store file that does not decode or does not hold together.
    #[error("credential store file {file} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A store file readable or writable by others.
    #[error(
        "credential store file {file} has mode {mode:o}; it must not be accessible to group or others (chmod 600)"
    )]
    InsecurePermissions {
        /// The file.
        file: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// An operating system error on a store file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The root password does not open the root credentials.
    #[error("wrong password for the root credentials")]
    WrongPassword,
    /// The store holds no root credentials.
    #[error("this credential store holds no root credentials")]
    NoRoot,
    /// The store already holds root credentials.
    #[error("this credential store already holds root credentials for {0}")]
    RootExists(PrincipalId),
    /// An exported root addressed to another store, or tampered with.
    #[error("the exported root credentials were not made for this store, or were altered")]
    NotForThisStore,
    /// A writecap that does not fit this store.
    #[error("writecap: {0}")]
    Writecap(#[from] WritecapError),
    /// A cryptographic failure.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// Bytes that do not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A password parameter outside the accepted range.
    #[error("key derivation parameters: {0}")]
    KdfParams(String),
    /// The store's cookie (the auth value of its TPM keys) is not theirs.
    #[error(
        "the cookie in {0} is not the one this store's TPM keys were created with, and the TPM refuses them without it"
    )]
    WrongCookie(PathBuf),
    /// The TPM is in dictionary-attack lockout and refuses password attempts.
    #[error(
        "the TPM refuses password attempts for now: too many wrong passwords put it in dictionary-attack lockout (it lifts after the TPM's recovery time; `tpm2_dictionarylockout --clear-lockout` lifts it with the lockout authorization)"
    )]
    TpmLockout,
    /// The TPM, or the way to it, failed.
    #[error("TPM: {0}")]
    Tpm(String),
}

impl From<CredStoreError> for CryptoError {
    fn from(error: CredStoreError) -> CryptoError {
        match error {
            CredStoreError::Crypto(inner) => inner,
            other => CryptoError::Backend(other.to_string()),
        }
    }
}

/// The public halves of a domain's root credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootPublicKeys {
    /// The root signing key; its principal is the first component of every path
    /// in the domain.
    pub signing: SigningPublicKey,
    /// The root's encryption key, for readcaps granted to the root.
    pub encryption: EncryptionPublicKey,
}

impl RootPublicKeys {
    /// The domain's root principal.
    pub fn principal(&self) -> PrincipalId {
        self.signing.principal()
    }
}

/// Root credentials in transit from one store to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedRoot {
    /// The root's public keys, so the receiver can say what it is importing.
    pub public: RootPublicKeys,
    /// How the outer key is derived from the password.
    pub kdf: KdfParams,
    /// The Argon2id salt.
    pub salt: [u8; 16],
    /// AES-256-GCM (password key) over the HPKE ciphertext to the receiving store.
    pub outer: serde_bytes::ByteBuf,
}

impl Encodable for ExportedRoot {
    const KIND: Kind = Kind::ExportedRoot;
    const MAX_LEN: usize = 16 * 1024;
}

/// The HPKE `info` of the inner layer of an export.
pub(crate) const EXPORT_INFO: &[u8] = b"blocktree root export v1";

/// Keeps a principal's keys and performs operations with them.
pub trait CredStore: Send + Sync {
    /// The runtime signing key.
    fn signing_public_key(&self) -> SigningPublicKey;
    /// The runtime encryption key (readcaps are wrapped to it).
    fn encryption_public_key(&self) -> EncryptionPublicKey;
    /// The key that exported root credentials are wrapped to.
    fn storage_public_key(&self) -> EncryptionPublicKey;
    /// The runtime's principal.
    fn principal(&self) -> PrincipalId {
        self.signing_public_key().principal()
    }
    /// Signs with the runtime key.
    fn sign(&self, message: &[u8]) -> Result<Signature, CredStoreError>;
    /// Whether the runtime key is held in this process, so that its signatures
    /// verify by construction ([`Signer::signs_in_process`]); false by default.
    fn signs_in_process(&self) -> bool {
        false
    }
    /// Opens an HPKE ciphertext addressed to the runtime encryption key.
    fn hpke_open(
        &self,
        sealed: &HpkeSealed,
        info: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CredStoreError>;

    /// The runtime's writecap, once one was imported.
    fn writecap(&self) -> Option<&Writecap>;
    /// Stores `writecap`, which must have been issued to this runtime.
    fn set_writecap(&mut self, writecap: Writecap) -> Result<(), CredStoreError>;

    /// The root credentials' public keys, if the store holds them.
    fn root_public(&self) -> Option<RootPublicKeys>;
    /// Generates root credentials protected by `password`.
    fn generate_root(&mut self, password: &str) -> Result<RootPublicKeys, CredStoreError>;
    /// A signer for the root key, after checking `password`.
    fn root_signer(&self, password: &str) -> Result<Box<dyn Signer + '_>, CredStoreError>;
    /// Exports the root credentials for the store whose storage key is `receiver`.
    fn export_root(
        &self,
        password: &str,
        receiver: &EncryptionPublicKey,
    ) -> Result<ExportedRoot, CredStoreError>;
    /// Imports root credentials exported for this store.
    fn import_root(
        &mut self,
        password: &str,
        exported: &ExportedRoot,
    ) -> Result<RootPublicKeys, CredStoreError>;
}

/// The runtime key of a store, as a [`Signer`].
pub struct RuntimeSigner<'a>(pub &'a dyn CredStore);

impl Signer for RuntimeSigner<'_> {
    fn public_key(&self) -> SigningPublicKey {
        self.0.signing_public_key()
    }
    fn sign(&self, message: &[u8]) -> Result<Signature, CryptoError> {
        Ok(self.0.sign(message)?)
    }
    fn signs_in_process(&self) -> bool {
        self.0.signs_in_process()
    }
}
