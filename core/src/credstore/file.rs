//! [`FileCredStore`]: credentials kept in files of one directory.
//!
//! - `runtime.cred` (0600): the runtime's signing, encryption and storage keys and
//!   its writecap. Like the original design's file store, it relies on the file
//!   system's permissions to protect these; use the TPM store in production.
//! - `root.cred` (0600, optional): the root keys, sealed with AES-256-GCM under a
//!   key derived from the root password with Argon2id.
//!
//! Files are replaced atomically (write, fsync, rename, fsync the directory), so a
//! crash leaves the old or the new credentials, never a torn file.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{CredStore, CredStoreError, EXPORT_INFO, ExportedRoot, KdfParams, RootPublicKeys};
use crate::aead::random_fill;
use crate::encoding::{self, Encodable, Kind};
use crate::hpke::{self, HpkeSealed};
use crate::keys::{
    EncryptionKeyPair, EncryptionPublicKey, Signature, Signer, SigningKeyPair, SigningPublicKey,
};
use crate::time::Timestamp;
use crate::writecap::{RevocationList, Writecap, WritecapError};

const RUNTIME_FILE: &str = "runtime.cred";
const ROOT_FILE: &str = "root.cred";
const ROOT_AT_REST_AAD: &[u8] = b"blocktree root credentials at rest v1";
const EXPORT_OUTER_AAD: &[u8] = b"blocktree root export outer v1";

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct RuntimeFile {
    #[serde(with = "serde_bytes")]
    signing_pkcs8: Vec<u8>,
    #[serde(with = "serde_bytes")]
    encryption_scalar: Vec<u8>,
    #[serde(with = "serde_bytes")]
    storage_scalar: Vec<u8>,
    #[zeroize(skip)]
    writecap: Option<Writecap>,
}

impl Encodable for RuntimeFile {
    const KIND: Kind = Kind::RuntimeCreds;
}

#[derive(Serialize, Deserialize)]
struct RootFile {
    public: RootPublicKeys,
    kdf: KdfParams,
    salt: [u8; 16],
    sealed: serde_bytes::ByteBuf,
}

impl Encodable for RootFile {
    const KIND: Kind = Kind::RootCreds;
    const MAX_LEN: usize = 16 * 1024;
}

/// The root private keys, only ever in memory or sealed. The TPM store seals the
/// same bytes, so an export opens in either kind of store.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub(super) struct RootSecrets {
    #[serde(with = "serde_bytes")]
    signing_pkcs8: Vec<u8>,
    #[serde(with = "serde_bytes")]
    encryption_scalar: Vec<u8>,
}

impl RootSecrets {
    /// Fresh root keys and their public halves.
    pub(super) fn generate() -> Result<(RootPublicKeys, RootSecrets), CredStoreError> {
        let signing = SigningKeyPair::generate()?;
        let encryption = EncryptionKeyPair::generate()?;
        let public = RootPublicKeys {
            signing: *signing.public(),
            encryption: *encryption.public(),
        };
        let secrets = RootSecrets {
            signing_pkcs8: signing.to_pkcs8()?.to_vec(),
            encryption_scalar: encryption.to_scalar()?.to_vec(),
        };
        Ok((public, secrets))
    }

    pub(super) fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        match postcard::to_allocvec(self) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(error) => unreachable!("serializing root secrets failed: {error}"),
        }
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Option<RootSecrets> {
        postcard::from_bytes(bytes).ok()
    }

    /// The key pairs, checked against the public keys they claim to be.
    pub(super) fn keys(
        &self,
        public: &RootPublicKeys,
    ) -> Option<(SigningKeyPair, EncryptionKeyPair)> {
        let signing = SigningKeyPair::from_pkcs8(&self.signing_pkcs8).ok()?;
        let encryption = EncryptionKeyPair::from_scalar(&self.encryption_scalar).ok()?;
        (signing.public() == &public.signing && encryption.public() == &public.encryption)
            .then_some((signing, encryption))
    }
}

/// A credential store in a local directory.
pub struct FileCredStore {
    dir: PathBuf,
    signing: SigningKeyPair,
    encryption: EncryptionKeyPair,
    storage: EncryptionKeyPair,
    writecap: Option<Writecap>,
    root: Option<RootFile>,
    kdf: KdfParams,
}

impl std::fmt::Debug for FileCredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCredStore")
            .field("dir", &self.dir)
            .field("principal", &self.signing.public().principal())
            .finish_non_exhaustive()
    }
}

pub(super) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CredStoreError + '_ {
    move |source| CredStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(super) fn corrupt(file: &Path, reason: impl ToString) -> CredStoreError {
    CredStoreError::Corrupt {
        file: file.to_owned(),
        reason: reason.to_string(),
    }
}

/// Replaces `path` with `bytes` atomically, mode 0600.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CredStoreError> {
    let temporary = path.with_extension("tmp");
    let _ = fs::remove_file(&temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io_error(&temporary))?;
    file.write_all(bytes).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    fs::rename(&temporary, path).map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(dir))?;
    }
    Ok(())
}

/// Reads a store file, refusing one that others can access.
pub(super) fn read_private(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, CredStoreError> {
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error(path)(error)),
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredStoreError::InsecurePermissions {
            file: path.to_owned(),
            mode,
        });
    }
    fs::read(path)
        .map(|bytes| Some(Zeroizing::new(bytes)))
        .map_err(io_error(path))
}

impl FileCredStore {
    /// Creates a store with fresh runtime credentials in `dir` (created 0700 if
    /// missing). Fails if `dir` already holds a store, or holds root credentials
    /// whose runtime file is gone: creating a store there and then generating or
    /// importing a root would replace those root credentials.
    pub fn create(dir: impl AsRef<Path>) -> Result<FileCredStore, CredStoreError> {
        let dir = dir.as_ref().to_owned();
        if dir.join(RUNTIME_FILE).exists() {
            return Err(CredStoreError::AlreadyExists(dir));
        }
        let orphan_root = dir.join(ROOT_FILE);
        if orphan_root.exists() {
            return Err(corrupt(
                &orphan_root,
                format!(
                    "root credentials without {RUNTIME_FILE} beside them; restore {RUNTIME_FILE} or move the root file away before creating a store here"
                ),
            ));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error(&dir))?;
        let store = FileCredStore {
            signing: SigningKeyPair::generate()?,
            encryption: EncryptionKeyPair::generate()?,
            storage: EncryptionKeyPair::generate()?,
            writecap: None,
            root: None,
            kdf: KdfParams::default(),
            dir,
        };
        store.save_runtime()?;
        Ok(store)
    }

    /// Opens the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<FileCredStore, CredStoreError> {
        let dir = dir.as_ref().to_owned();
        let runtime_path = dir.join(RUNTIME_FILE);
        let bytes =
            read_private(&runtime_path)?.ok_or_else(|| CredStoreError::NotFound(dir.clone()))?;
        let runtime: RuntimeFile =
            encoding::decode(&bytes).map_err(|error| corrupt(&runtime_path, error))?;
        let signing = SigningKeyPair::from_pkcs8(&runtime.signing_pkcs8)
            .map_err(|error| corrupt(&runtime_path, error))?;
        let encryption = EncryptionKeyPair::from_scalar(&runtime.encryption_scalar)
            .map_err(|error| corrupt(&runtime_path, error))?;
        let storage = EncryptionKeyPair::from_scalar(&runtime.storage_scalar)
            .map_err(|error| corrupt(&runtime_path, error))?;

        let root_path = dir.join(ROOT_FILE);
        let root = match read_private(&root_path)? {
            None => None,
            Some(bytes) => {
                let root: RootFile =
                    encoding::decode(&bytes).map_err(|error| corrupt(&root_path, error))?;
                root.kdf
                    .check()
                    .map_err(|error| corrupt(&root_path, error))?;
                Some(root)
            }
        };
        Ok(FileCredStore {
            dir,
            signing,
            encryption,
            storage,
            writecap: runtime.writecap.clone(),
            root,
            kdf: KdfParams::default(),
        })
    }

    /// Sets the Argon2id cost used when root credentials are next sealed.
    pub fn with_kdf_params(mut self, kdf: KdfParams) -> Result<FileCredStore, CredStoreError> {
        kdf.check()?;
        self.kdf = kdf;
        Ok(self)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn save_runtime(&self) -> Result<(), CredStoreError> {
        let runtime = RuntimeFile {
            signing_pkcs8: self.signing.to_pkcs8()?.to_vec(),
            encryption_scalar: self.encryption.to_scalar()?.to_vec(),
            storage_scalar: self.storage.to_scalar()?.to_vec(),
            writecap: self.writecap.clone(),
        };
        write_atomically(
            &self.dir.join(RUNTIME_FILE),
            &Zeroizing::new(encoding::encode(&runtime)),
        )
    }

    fn seal_root(
        &self,
        public: RootPublicKeys,
        secrets: &RootSecrets,
        password: &str,
    ) -> Result<RootFile, CredStoreError> {
        let mut salt = [0u8; 16];
        random_fill(&mut salt)?;
        let key = self.kdf.derive(password, &salt)?;
        let sealed = key.seal(&root_aad(ROOT_AT_REST_AAD, &public), &secrets.to_bytes())?;
        Ok(RootFile {
            public,
            kdf: self.kdf,
            salt,
            sealed: serde_bytes::ByteBuf::from(sealed),
        })
    }

    fn store_root(&mut self, root: RootFile) -> Result<RootPublicKeys, CredStoreError> {
        write_atomically(&self.dir.join(ROOT_FILE), &encoding::encode(&root))?;
        let public = root.public;
        self.root = Some(root);
        Ok(public)
    }

    fn unseal_root(&self, password: &str) -> Result<(RootPublicKeys, RootSecrets), CredStoreError> {
        let root = self.root.as_ref().ok_or(CredStoreError::NoRoot)?;
        let key = root.kdf.derive(password, &root.salt)?;
        let plaintext = key
            .open(&root_aad(ROOT_AT_REST_AAD, &root.public), &root.sealed)
            .map_err(|_| CredStoreError::WrongPassword)?;
        let path = self.dir.join(ROOT_FILE);
        let secrets = RootSecrets::from_bytes(&plaintext)
            .ok_or_else(|| corrupt(&path, "sealed root keys do not decode"))?;
        Ok((root.public, secrets))
    }
}

pub(super) fn root_aad(context: &[u8], public: &RootPublicKeys) -> Vec<u8> {
    let mut aad = context.to_vec();
    aad.extend_from_slice(public.principal().as_bytes());
    aad
}

/// Wraps `secrets` for the store whose storage key is `receiver`: HPKE to that
/// key inside AES-256-GCM under a key derived from `password` with `kdf`.
pub(super) fn seal_export(
    kdf: &KdfParams,
    password: &str,
    public: RootPublicKeys,
    secrets: &RootSecrets,
    receiver: &EncryptionPublicKey,
) -> Result<ExportedRoot, CredStoreError> {
    let inner = hpke::seal(
        receiver,
        EXPORT_INFO,
        public.principal().as_bytes(),
        &secrets.to_bytes(),
    )?;
    let inner = match postcard::to_allocvec(&inner) {
        Ok(bytes) => bytes,
        Err(error) => unreachable!("serializing an HPKE ciphertext failed: {error}"),
    };
    let mut salt = [0u8; 16];
    random_fill(&mut salt)?;
    let key = kdf.derive(password, &salt)?;
    let outer = key.seal(&root_aad(EXPORT_OUTER_AAD, &public), &inner)?;
    Ok(ExportedRoot {
        public,
        kdf: *kdf,
        salt,
        outer: serde_bytes::ByteBuf::from(outer),
    })
}

/// Opens both layers of `exported` with `password` and the receiving store's
/// storage key (`storage`, whose Diffie-Hellman step is `diffie_hellman`), and
/// checks the keys inside are the ones the export names.
pub(super) fn open_export(
    password: &str,
    exported: &ExportedRoot,
    storage: &EncryptionPublicKey,
    diffie_hellman: impl FnOnce(&EncryptionPublicKey) -> Result<Zeroizing<[u8; 32]>, CredStoreError>,
) -> Result<RootSecrets, CredStoreError> {
    let key = exported.kdf.derive(password, &exported.salt)?;
    let inner = key
        .open(
            &root_aad(EXPORT_OUTER_AAD, &exported.public),
            &exported.outer,
        )
        .map_err(|_| CredStoreError::WrongPassword)?;
    let inner: HpkeSealed =
        postcard::from_bytes(&inner).map_err(|_| CredStoreError::NotForThisStore)?;
    let plaintext = hpke::open::<CredStoreError>(
        storage,
        diffie_hellman,
        &inner,
        EXPORT_INFO,
        exported.public.principal().as_bytes(),
    )
    .map_err(|error| match error {
        // The receiving store itself failed (a TPM that is gone, say): say so
        // rather than blame the export.
        CredStoreError::Tpm(_) | CredStoreError::WrongCookie(_) => error,
        _ => CredStoreError::NotForThisStore,
    })?;
    let secrets = RootSecrets::from_bytes(&plaintext).ok_or(CredStoreError::NotForThisStore)?;
    secrets
        .keys(&exported.public)
        .ok_or(CredStoreError::NotForThisStore)?;
    Ok(secrets)
}

impl CredStore for FileCredStore {
    fn signing_public_key(&self) -> SigningPublicKey {
        *self.signing.public()
    }

    fn encryption_public_key(&self) -> EncryptionPublicKey {
        *self.encryption.public()
    }

    fn storage_public_key(&self) -> EncryptionPublicKey {
        *self.storage.public()
    }

    fn sign(&self, message: &[u8]) -> Result<Signature, CredStoreError> {
        Ok(self.signing.sign(message)?)
    }

    fn signs_in_process(&self) -> bool {
        // The runtime key pair is held in memory (a SigningKeyPair).
        true
    }

    fn hpke_open(
        &self,
        sealed: &HpkeSealed,
        info: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CredStoreError> {
        hpke::open::<CredStoreError>(
            self.encryption.public(),
            |enc| Ok(self.encryption.diffie_hellman(enc)?),
            sealed,
            info,
            aad,
        )
    }

    fn writecap(&self) -> Option<&Writecap> {
        self.writecap.as_ref()
    }

    fn set_writecap(&mut self, writecap: Writecap) -> Result<(), CredStoreError> {
        let target = writecap.path().cloned().ok_or(WritecapError::Empty)?;
        writecap.validate_for(
            &self.principal(),
            &target,
            Timestamp::now(),
            &RevocationList::new(),
        )?;
        self.writecap = Some(writecap);
        self.save_runtime()
    }

    fn root_public(&self) -> Option<RootPublicKeys> {
        self.root.as_ref().map(|root| root.public)
    }

    fn generate_root(&mut self, password: &str) -> Result<RootPublicKeys, CredStoreError> {
        if let Some(existing) = self.root_public() {
            return Err(CredStoreError::RootExists(existing.principal()));
        }
        let (public, secrets) = RootSecrets::generate()?;
        let root = self.seal_root(public, &secrets, password)?;
        self.store_root(root)
    }

    fn root_signer(&self, password: &str) -> Result<Box<dyn Signer + '_>, CredStoreError> {
        let (public, secrets) = self.unseal_root(password)?;
        let path = self.dir.join(ROOT_FILE);
        let (signing, _) = secrets
            .keys(&public)
            .ok_or_else(|| corrupt(&path, "root keys do not match their public keys"))?;
        Ok(Box::new(signing))
    }

    fn export_root(
        &self,
        password: &str,
        receiver: &EncryptionPublicKey,
    ) -> Result<ExportedRoot, CredStoreError> {
        let (public, secrets) = self.unseal_root(password)?;
        seal_export(&self.kdf, password, public, &secrets, receiver)
    }

    fn import_root(
        &mut self,
        password: &str,
        exported: &ExportedRoot,
    ) -> Result<RootPublicKeys, CredStoreError> {
        if let Some(existing) = self.root_public() {
            return Err(CredStoreError::RootExists(existing.principal()));
        }
        let secrets = open_export(password, exported, self.storage.public(), |enc| {
            Ok(self.storage.diffie_hellman(enc)?)
        })?;
        let root = self.seal_root(exported.public, &secrets, password)?;
        self.store_root(root)
    }
}
