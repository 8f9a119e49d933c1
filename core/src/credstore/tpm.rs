//! [`TpmCredStore`]: credentials kept by a TPM 2.0 (feature `tpm`, issue #8).
//!
//! The runtime's signing, encryption and storage keys are created inside the TPM
//! as P-256 keys that can never leave it (fixedTPM, fixedParent,
//! sensitiveDataOrigin). Using them takes a random 32-byte *cookie*, their auth
//! value, kept in a file only the owner can read: an attacker needs both the TPM
//! and the cookie to use the process's credentials, as the original design says.
//! Signing is TPM2_Sign (ECDSA); readcaps and exported root credentials are
//! opened with HPKE whose Diffie-Hellman step is TPM2_ECDH_ZGen.
//!
//! Root credentials are ordinary P-256 keys, because they must be exportable to
//! another store. At rest they are encrypted (AES-256-GCM) under a random key that
//! is *sealed by the TPM*: a TPM sealed data object under the storage primary key
//! whose auth value is derived from the root password with Argon2id. Only this
//! TPM, given the password, unseals that key; it counts wrong passwords against its
//! dictionary-attack protection, so the password cannot be guessed offline from
//! the files. Export and import use exactly the layers of [`FileCredStore`], so
//! root credentials move between the two kinds of store in either direction.
//!
//! The store's directory (mode 0700) holds, each file 0600:
//!
//! - `tpm.cred`: the TCTI the store was created with, the TPM-wrapped key blobs
//!   (public area and encrypted private part, loadable only by this TPM), the
//!   public keys, a check value of the cookie, and the writecap;
//! - `cookie`: the 32-byte cookie;
//! - `tpm-root.cred` (optional): the root's public keys, the Argon2id parameters
//!   and salt, the sealed data object and the encrypted root keys.
//!
//! The TPM is reached through a TCTI ([`Tcti`]): `device:/dev/tpmrm0` (the kernel's
//! resource manager), `tabrmd:` (the user-space one), `swtpm:host=H,port=P` or
//! `mssim:host=H,port=P` (emulators).
//!
//! [`FileCredStore`]: super::FileCredStore

mod device;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use tss_esapi::structures::Public;
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::UnMarshall;
use zeroize::Zeroizing;

use self::device::{AuthValue, Blob, KeySet, Role, Tpm, TpmError};
use super::file::{
    RootSecrets, corrupt, io_error, open_export, read_private, root_aad, seal_export,
    write_atomically,
};
use super::{CredStore, CredStoreError, ExportedRoot, KdfParams, RootPublicKeys};
use crate::aead::{SymmetricKey, random_fill};
use crate::encoding::{self, Encodable, Kind};
use crate::hash::HashAlgorithm;
use crate::hpke::{self, HpkeSealed};
use crate::keys::{
    CryptoError, EncryptionPublicKey, POINT_LEN, Signature, Signer, SigningPublicKey,
};
use crate::time::Timestamp;
use crate::writecap::{RevocationList, Writecap, WritecapError};

/// The kernel's TPM resource manager device, what an appliance uses.
pub const DEFAULT_DEVICE: &str = "/dev/tpmrm0";

const RUNTIME_FILE: &str = "tpm.cred";
const COOKIE_FILE: &str = "cookie";
const ROOT_FILE: &str = "tpm-root.cred";
/// The file store's runtime file: a directory holding one is not a TPM store.
const FILE_STORE_RUNTIME: &str = "runtime.cred";
const ROOT_AT_REST_AAD: &[u8] = b"blocktree tpm root credentials at rest v1";
const COOKIE_CHECK_CONTEXT: &[u8] = b"blocktree tpm cookie check v1";
const COOKIE_LEN: usize = 32;

/// Where the TPM is: a TCTI name and its configuration, as tpm2-tools spell them
/// (`device:/dev/tpmrm0`, `tabrmd:bus_name=com.intel.tss2.Tabrmd`,
/// `swtpm:host=127.0.0.1,port=2321`, `mssim:host=127.0.0.1,port=2321`).
#[derive(Clone, PartialEq, Eq)]
pub struct Tcti {
    text: String,
    conf: TctiNameConf,
}

impl Tcti {
    /// The kernel resource manager, `device:/dev/tpmrm0`.
    pub fn resource_manager() -> Tcti {
        // A device path of its own never fails to parse; the default (`/dev/tpm0`)
        // is what tss-esapi would fall back to, and is never reached.
        let conf = tss_esapi::tcti_ldr::DeviceConfig::from_str(DEFAULT_DEVICE).unwrap_or_default();
        Tcti {
            text: format!("device:{DEFAULT_DEVICE}"),
            conf: TctiNameConf::Device(conf),
        }
    }

    /// The TCTI as text, as it was given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Tcti {
    type Err = CredStoreError;

    fn from_str(text: &str) -> Result<Tcti, CredStoreError> {
        let conf = TctiNameConf::from_str(text).map_err(|_| {
            CredStoreError::Tpm(format!(
                "`{text}` is not a TCTI: expected device:PATH, tabrmd:[bus_name=NAME], \
                 swtpm:host=HOST,port=PORT or mssim:host=HOST,port=PORT"
            ))
        })?;
        Ok(Tcti {
            text: text.to_owned(),
            conf,
        })
    }
}

impl fmt::Display for Tcti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Tcti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tcti({})", self.text)
    }
}

#[derive(Serialize, Deserialize)]
struct RuntimeFile {
    /// The TCTI the store was created with, used when opening it unless told
    /// otherwise.
    tcti: String,
    /// The key blobs: signing, encryption, storage.
    keys: KeySet,
    signing: SigningPublicKey,
    encryption: EncryptionPublicKey,
    storage: EncryptionPublicKey,
    /// SHA-256 of a context string and the cookie, to tell a wrong cookie file
    /// before the TPM is asked.
    cookie_check: [u8; 32],
    writecap: Option<Writecap>,
}

impl Encodable for RuntimeFile {
    const KIND: Kind = Kind::TpmRuntimeCreds;
    const MAX_LEN: usize = 64 * 1024;
}

#[derive(Serialize, Deserialize)]
struct RootFile {
    public: RootPublicKeys,
    kdf: KdfParams,
    salt: [u8; 16],
    /// The sealed data object holding the key of `secrets`.
    sealed: Blob,
    /// The root keys, AES-256-GCM under the sealed key.
    secrets: serde_bytes::ByteBuf,
}

impl Encodable for RootFile {
    const KIND: Kind = Kind::TpmRootCreds;
    const MAX_LEN: usize = 16 * 1024;
}

/// What the store and its signers share: the TPM thread and what error messages
/// need to name.
struct Shared {
    tpm: Tpm,
    tcti: Tcti,
    cookie_file: PathBuf,
}

impl Shared {
    /// Says what went wrong, in the store's terms; a refused auth value is
    /// `bad_auth`.
    fn failure(&self, error: TpmError, bad_auth: CredStoreError) -> CredStoreError {
        match error {
            TpmError::BadAuth => bad_auth,
            TpmError::Lockout => CredStoreError::TpmLockout,
            TpmError::Connect(message) => {
                CredStoreError::Tpm(format!("{message} (TCTI {})", self.tcti))
            }
            other => CredStoreError::Tpm(format!("{other} (TCTI {})", self.tcti)),
        }
    }

    fn wrong_cookie(&self) -> CredStoreError {
        CredStoreError::WrongCookie(self.cookie_file.clone())
    }

    fn sign(&self, message: &[u8]) -> Result<Signature, CredStoreError> {
        let digest = HashAlgorithm::Sha256.hash(&[message]);
        let digest: [u8; 32] = digest
            .as_bytes()
            .try_into()
            .map_err(|_| CredStoreError::Crypto(CryptoError::Internal("SHA-256 length")))?;
        let signature = self
            .tpm
            .sign(digest)
            .map_err(|error| self.failure(error, self.wrong_cookie()))?;
        Ok(Signature::from_bytes(signature))
    }

    fn ecdh(
        &self,
        role: Role,
        peer: &EncryptionPublicKey,
    ) -> Result<Zeroizing<[u8; 32]>, CredStoreError> {
        self.tpm
            .ecdh(role, *peer.as_sec1())
            .map_err(|error| self.failure(error, self.wrong_cookie()))
    }
}

/// A credential store whose runtime keys live in a TPM 2.0.
pub struct TpmCredStore {
    dir: PathBuf,
    shared: Arc<Shared>,
    runtime: RuntimeFile,
    root: Option<RootFile>,
    kdf: KdfParams,
}

impl fmt::Debug for TpmCredStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmCredStore")
            .field("dir", &self.dir)
            .field("tcti", &self.shared.tcti)
            .field("principal", &self.runtime.signing.principal())
            .finish_non_exhaustive()
    }
}

/// A fresh cookie, its last byte never zero (see [`AuthValue`]).
fn new_cookie() -> Result<AuthValue, CredStoreError> {
    let mut cookie = Zeroizing::new([0u8; COOKIE_LEN]);
    random_fill(cookie.as_mut())?;
    if cookie[COOKIE_LEN - 1] == 0 {
        cookie[COOKIE_LEN - 1] = 1;
    }
    Ok(cookie)
}

fn cookie_check(cookie: &[u8]) -> [u8; 32] {
    let digest = HashAlgorithm::Sha256.hash(&[COOKIE_CHECK_CONTEXT, cookie]);
    let mut out = [0u8; 32];
    out.copy_from_slice(&digest.as_bytes()[..32]);
    out
}

/// The auth value of the sealed root key: Argon2id of the password, its last
/// byte never zero.
fn password_auth(
    kdf: &KdfParams,
    password: &str,
    salt: &[u8],
) -> Result<AuthValue, CredStoreError> {
    let key = kdf.derive(password, salt)?;
    let mut auth = Zeroizing::new(*key.as_bytes());
    if auth[31] == 0 {
        auth[31] = 1;
    }
    Ok(auth)
}

/// The public key in a key blob, checked to be what this store creates.
fn blob_point(blob: &Blob, role: Role) -> Result<[u8; POINT_LEN], String> {
    let public = Public::unmarshall(&blob.public)
        .map_err(|_| format!("the {} blob does not decode", role.name()))?;
    device::check_runtime_key(&public, role)?;
    device::public_point(&public).map_err(|error| error.to_string())
}

impl TpmCredStore {
    /// Creates a store in `dir` (created 0700 if missing) with fresh runtime keys
    /// made by the TPM at `tcti`. Fails if `dir` already holds a store of either
    /// kind, or TPM root credentials without the runtime file beside them.
    pub fn create(dir: impl AsRef<Path>, tcti: &Tcti) -> Result<TpmCredStore, CredStoreError> {
        let dir = dir.as_ref().to_owned();
        if dir.join(RUNTIME_FILE).exists() || dir.join(FILE_STORE_RUNTIME).exists() {
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
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error(&dir))?;

        let cookie = new_cookie()?;
        let cookie_file = dir.join(COOKIE_FILE);
        let shared = Shared {
            tpm: Tpm::start(tcti.conf.clone(), cookie.clone(), None)
                .map_err(|error| CredStoreError::Tpm(error.to_string()))?,
            tcti: tcti.clone(),
            cookie_file: cookie_file.clone(),
        };
        let keys = shared.tpm.create_keys().map_err(|error| {
            shared.failure(
                error,
                CredStoreError::Tpm("the TPM refused to create keys".into()),
            )
        })?;
        let point = |role: Role| {
            blob_point(&keys[role.index()], role)
                .map_err(|reason| CredStoreError::Tpm(format!("TPM2_Create: {reason}")))
        };
        let runtime = RuntimeFile {
            tcti: tcti.as_str().to_owned(),
            signing: SigningPublicKey::from_sec1(&point(Role::Signing)?)?,
            encryption: EncryptionPublicKey::from_sec1(&point(Role::Encryption)?)?,
            storage: EncryptionPublicKey::from_sec1(&point(Role::Storage)?)?,
            keys,
            cookie_check: cookie_check(cookie.as_ref()),
            writecap: None,
        };
        // The cookie first: a runtime file whose cookie was never written would
        // name keys nobody can use.
        write_atomically(&cookie_file, cookie.as_ref())?;
        let store = TpmCredStore {
            dir,
            shared: Arc::new(shared),
            runtime,
            root: None,
            kdf: KdfParams::default(),
        };
        store.save_runtime()?;
        Ok(store)
    }

    /// Opens the store in `dir`, on the TPM it was created with.
    pub fn open(dir: impl AsRef<Path>) -> Result<TpmCredStore, CredStoreError> {
        Self::open_inner(dir.as_ref(), None)
    }

    /// Opens the store in `dir` on the TPM at `tcti` (the same TPM, reached
    /// another way: an emulator on another port, tabrmd instead of the device).
    pub fn open_with(dir: impl AsRef<Path>, tcti: &Tcti) -> Result<TpmCredStore, CredStoreError> {
        Self::open_inner(dir.as_ref(), Some(tcti))
    }

    /// Whether `dir` holds a TPM store (its runtime file exists).
    pub fn exists_in(dir: impl AsRef<Path>) -> bool {
        dir.as_ref().join(RUNTIME_FILE).exists()
    }

    fn open_inner(dir: &Path, tcti: Option<&Tcti>) -> Result<TpmCredStore, CredStoreError> {
        let dir = dir.to_owned();
        let runtime_path = dir.join(RUNTIME_FILE);
        let bytes =
            read_private(&runtime_path)?.ok_or_else(|| CredStoreError::NotFound(dir.clone()))?;
        let runtime: RuntimeFile =
            encoding::decode(&bytes).map_err(|error| corrupt(&runtime_path, error))?;
        for role in Role::ALL {
            let point = blob_point(&runtime.keys[role.index()], role)
                .map_err(|reason| corrupt(&runtime_path, reason))?;
            let named = match role {
                Role::Signing => runtime.signing.as_sec1(),
                Role::Encryption => runtime.encryption.as_sec1(),
                Role::Storage => runtime.storage.as_sec1(),
            };
            if &point != named {
                return Err(corrupt(
                    &runtime_path,
                    format!(
                        "the {} blob holds another key than the file names",
                        role.name()
                    ),
                ));
            }
        }

        let cookie_file = dir.join(COOKIE_FILE);
        let cookie_bytes = read_private(&cookie_file)?.ok_or_else(|| {
            corrupt(
                &cookie_file,
                "missing: the store's keys cannot be used without it",
            )
        })?;
        if cookie_bytes.len() != COOKIE_LEN {
            return Err(corrupt(
                &cookie_file,
                format!(
                    "holds {} bytes; a cookie has {COOKIE_LEN}",
                    cookie_bytes.len()
                ),
            ));
        }
        let mut cookie = Zeroizing::new([0u8; COOKIE_LEN]);
        cookie.copy_from_slice(&cookie_bytes);
        if cookie_check(cookie.as_ref()) != runtime.cookie_check {
            return Err(CredStoreError::WrongCookie(cookie_file));
        }

        let tcti = match tcti {
            Some(tcti) => tcti.clone(),
            None => runtime
                .tcti
                .parse()
                .map_err(|error| corrupt(&runtime_path, error))?,
        };

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

        let shared = Shared {
            tpm: Tpm::start(tcti.conf.clone(), cookie, Some(runtime.keys.clone()))
                .map_err(|error| CredStoreError::Tpm(error.to_string()))?,
            tcti,
            cookie_file,
        };
        shared.tpm.check().map_err(|error| match error {
            TpmError::Foreign(what) => CredStoreError::Tpm(format!(
                "the TPM at {} cannot load the {what} in {}: it was made by another TPM, or this TPM was cleared since",
                shared.tcti,
                runtime_path.display()
            )),
            other => shared.failure(other, shared.wrong_cookie()),
        })?;
        Ok(TpmCredStore {
            dir,
            shared: Arc::new(shared),
            runtime,
            root,
            kdf: KdfParams::default(),
        })
    }

    /// Sets the Argon2id cost used when root credentials are next sealed.
    pub fn with_kdf_params(mut self, kdf: KdfParams) -> Result<TpmCredStore, CredStoreError> {
        kdf.check()?;
        self.kdf = kdf;
        Ok(self)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The TCTI this store talks to its TPM through.
    pub fn tcti(&self) -> &Tcti {
        &self.shared.tcti
    }

    /// A signer for the runtime key that can outlive this borrow and move between
    /// threads, e.g. the key of a bttp endpoint (`Arc::new(store.signer())`).
    pub fn signer(&self) -> TpmSigner {
        TpmSigner {
            shared: self.shared.clone(),
            public: self.runtime.signing,
        }
    }

    fn save_runtime(&self) -> Result<(), CredStoreError> {
        write_atomically(
            &self.dir.join(RUNTIME_FILE),
            &encoding::encode(&self.runtime),
        )
    }

    fn root_path(&self) -> PathBuf {
        self.dir.join(ROOT_FILE)
    }

    fn seal_root(
        &self,
        public: RootPublicKeys,
        secrets: &RootSecrets,
        password: &str,
    ) -> Result<RootFile, CredStoreError> {
        let mut salt = [0u8; 16];
        random_fill(&mut salt)?;
        let auth = password_auth(&self.kdf, password, &salt)?;
        let key = SymmetricKey::generate()?;
        let sealed = self
            .shared
            .tpm
            .seal(auth, Zeroizing::new(key.as_bytes().to_vec()))
            .map_err(|error| {
                self.shared.failure(
                    error,
                    CredStoreError::Tpm("the TPM refused to seal the root key".into()),
                )
            })?;
        let encrypted = key.seal(&root_aad(ROOT_AT_REST_AAD, &public), &secrets.to_bytes())?;
        Ok(RootFile {
            public,
            kdf: self.kdf,
            salt,
            sealed,
            secrets: serde_bytes::ByteBuf::from(encrypted),
        })
    }

    fn store_root(&mut self, root: RootFile) -> Result<RootPublicKeys, CredStoreError> {
        write_atomically(&self.root_path(), &encoding::encode(&root))?;
        let public = root.public;
        self.root = Some(root);
        Ok(public)
    }

    fn unseal_root(&self, password: &str) -> Result<(RootPublicKeys, RootSecrets), CredStoreError> {
        let root = self.root.as_ref().ok_or(CredStoreError::NoRoot)?;
        let auth = password_auth(&root.kdf, password, &root.salt)?;
        let key =
            self.shared
                .tpm
                .unseal(root.sealed.clone(), auth)
                .map_err(|error| match error {
                    TpmError::Foreign(_) => corrupt(&self.root_path(), error),
                    other => self.shared.failure(other, CredStoreError::WrongPassword),
                })?;
        let path = self.root_path();
        let key = SymmetricKey::from_slice(&key)
            .ok_or_else(|| corrupt(&path, "the TPM unsealed a key of the wrong length"))?;
        let plaintext = key
            .open(&root_aad(ROOT_AT_REST_AAD, &root.public), &root.secrets)
            .map_err(|_| {
                corrupt(
                    &path,
                    "the root keys do not open with the key the TPM unsealed",
                )
            })?;
        let secrets = RootSecrets::from_bytes(&plaintext)
            .ok_or_else(|| corrupt(&path, "sealed root keys do not decode"))?;
        Ok((root.public, secrets))
    }
}

impl CredStore for TpmCredStore {
    fn signing_public_key(&self) -> SigningPublicKey {
        self.runtime.signing
    }

    fn encryption_public_key(&self) -> EncryptionPublicKey {
        self.runtime.encryption
    }

    fn storage_public_key(&self) -> EncryptionPublicKey {
        self.runtime.storage
    }

    fn sign(&self, message: &[u8]) -> Result<Signature, CredStoreError> {
        self.shared.sign(message)
    }

    fn hpke_open(
        &self,
        sealed: &HpkeSealed,
        info: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CredStoreError> {
        hpke::open::<CredStoreError>(
            &self.runtime.encryption,
            |enc| self.shared.ecdh(Role::Encryption, enc),
            sealed,
            info,
            aad,
        )
    }

    fn writecap(&self) -> Option<&Writecap> {
        self.runtime.writecap.as_ref()
    }

    fn set_writecap(&mut self, writecap: Writecap) -> Result<(), CredStoreError> {
        let target = writecap.path().cloned().ok_or(WritecapError::Empty)?;
        writecap.validate_for(
            &self.principal(),
            &target,
            Timestamp::now(),
            &RevocationList::new(),
        )?;
        let previous = self.runtime.writecap.replace(writecap);
        if let Err(error) = self.save_runtime() {
            self.runtime.writecap = previous;
            return Err(error);
        }
        Ok(())
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
        let (signing, _) = secrets.keys(&public).ok_or_else(|| {
            corrupt(
                &self.root_path(),
                "root keys do not match their public keys",
            )
        })?;
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
        let secrets = open_export(password, exported, &self.runtime.storage, |enc| {
            self.shared.ecdh(Role::Storage, enc)
        })?;
        let root = self.seal_root(exported.public, &secrets, password)?;
        self.store_root(root)
    }
}

/// The runtime key of a [`TpmCredStore`] as an owned [`Signer`]: cheap to clone,
/// `Send + Sync + 'static`, every signature made by the TPM. The store's TPM
/// connection stays open while a signer lives.
#[derive(Clone)]
pub struct TpmSigner {
    shared: Arc<Shared>,
    public: SigningPublicKey,
}

impl fmt::Debug for TpmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TpmSigner({})", self.public.principal())
    }
}

impl Signer for TpmSigner {
    fn public_key(&self) -> SigningPublicKey {
        self.public
    }

    fn sign(&self, message: &[u8]) -> Result<Signature, CryptoError> {
        Ok(self.shared.sign(message)?)
    }
}
