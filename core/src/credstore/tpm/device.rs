//! The TPM itself: one thread owns the ESAPI context and performs every command.
//!
//! `tss_esapi::Context` is neither `Send` nor `Sync`, while a [`CredStore`] is
//! shared between threads (rustls signs handshakes on its own threads). Rather
//! than assert thread safety with `unsafe`, a worker thread owns the context and
//! the store sends it [`Request`]s over a channel, one at a time, which is also
//! how a TPM works. Requests are plain data, so one that fails because the
//! connection broke (a restarted swtpm, a restarted resource manager) is retried
//! once on a fresh connection, with the keys loaded again from their blobs.
//!
//! What the thread keeps loaded: a TPM guarantees room for only three transient
//! objects (`TPM_PT_HR_TRANSIENT_MIN`), and the kernel resource manager gives each
//! connection no more, so the primary key and the three runtime keys are loaded
//! on demand and the least recently used is flushed to make room.
//!
//! Every command that needs authorization uses one HMAC session salted to the
//! primary key, so the key's auth value (the cookie, or the value derived from the
//! root password) never crosses the bus in the clear, and secrets that do cross
//! it (a new object's auth value and sealed data, ECDH output, unsealed data) are
//! parameter-encrypted (AES-128-CFB).
//!
//! [`CredStore`]: crate::credstore::CredStore

use std::sync::mpsc;
use std::thread;

use tss_esapi::Context;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, Digest, EccParameter, EccPoint, EccScheme, HashScheme, HashcheckTicket,
    KeyDerivationFunctionScheme, KeyedHashScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData,
    Signature as TpmSignature, SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use zeroize::Zeroizing;

use crate::keys::{POINT_LEN, SIGNATURE_LEN};

/// The auth value of a key: 32 bytes, the last one never zero (the TPM drops
/// trailing zeros of auth values; keeping the last byte set keeps every party's
/// idea of the value the same).
pub(super) type AuthValue = Zeroizing<[u8; 32]>;

/// Objects a TPM is guaranteed to hold at once (`TPM_PT_HR_TRANSIENT_MIN`).
const MAX_RESIDENT: usize = 3;

/// The three keys of a runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// ECDSA P-256: signs for the runtime.
    Signing,
    /// ECDH P-256: opens readcaps.
    Encryption,
    /// ECDH P-256: opens exported root credentials.
    Storage,
}

impl Role {
    /// All roles, in the order of their keys in a [`KeySet`].
    pub(super) const ALL: [Role; 3] = [Role::Signing, Role::Encryption, Role::Storage];

    /// The position of the role's key in a [`KeySet`].
    pub(super) fn index(self) -> usize {
        match self {
            Role::Signing => 0,
            Role::Encryption => 1,
            Role::Storage => 2,
        }
    }

    /// What the key is called in messages.
    pub(super) fn name(self) -> &'static str {
        match self {
            Role::Signing => "signing key",
            Role::Encryption => "encryption key",
            Role::Storage => "storage key",
        }
    }
}

/// A TPM object as the TPM wrapped it: the marshalled public area (TPMT_PUBLIC)
/// and the private part encrypted under the primary key (TPM2B_PRIVATE contents).
/// Only the TPM that made it can load it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Blob {
    /// TPMT_PUBLIC.
    #[serde(with = "serde_bytes")]
    pub(super) public: Vec<u8>,
    /// The TPM2B_PRIVATE buffer.
    #[serde(with = "serde_bytes")]
    pub(super) private: Vec<u8>,
}

/// The blobs of a runtime's keys, indexed by [`Role`].
pub(super) type KeySet = [Blob; 3];

/// What went wrong, before the store says it in its own terms.
#[derive(Debug)]
pub(super) enum TpmError {
    /// The TPM refused the auth value of the object (a wrong cookie or password).
    BadAuth,
    /// The TPM is in dictionary-attack lockout.
    Lockout,
    /// The TPM cannot load a blob: another TPM made it, or the TPM was cleared.
    Foreign(&'static str),
    /// No TPM at the TCTI, or the connection broke.
    Connect(String),
    /// The TPM no longer has what this connection loaded: it was restarted.
    Stale(String),
    /// Something else; the message names the command.
    Other(String),
}

impl std::fmt::Display for TpmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TpmError::BadAuth => f.write_str("the TPM refused the authorization value"),
            TpmError::Lockout => f.write_str("the TPM is in dictionary-attack lockout"),
            TpmError::Foreign(what) => write!(
                f,
                "the TPM cannot load the {what}: it was made by another TPM, or this TPM was cleared since"
            ),
            TpmError::Connect(message) | TpmError::Stale(message) | TpmError::Other(message) => {
                f.write_str(message)
            }
        }
    }
}

/// The TSS layer of TCTI errors (`TSS2_TCTI_RC_LAYER`): the connection, not the TPM.
const TCTI_LAYER: u32 = 10 << 16;

/// Does `code` come from the TCTI layer (the way to the TPM) rather than the TPM?
fn is_tcti_failure(code: Tss2ResponseCode) -> bool {
    // tss-esapi 7 does not expose the layer of a code; compare with every TCTI
    // base code instead (TSS2_BASE_RC_* run from 1 to 0x30).
    (1..=0x30).any(|base| code == Tss2ResponseCode::from(TCTI_LAYER | base))
}

/// Turns a failed `command` into a [`TpmError`].
fn failed(command: &'static str, error: tss_esapi::Error) -> TpmError {
    let tss_esapi::Error::Tss2Error(code) = error else {
        return TpmError::Other(format!("{command}: {error}"));
    };
    if is_tcti_failure(code) {
        return TpmError::Connect(format!("{command}: the connection to the TPM failed"));
    }
    use Tss2ResponseCodeKind as Kind;
    match (code, code.kind()) {
        (Tss2ResponseCode::FormatOne(_), Some(Kind::AuthFail | Kind::BadAuth)) => TpmError::BadAuth,
        (Tss2ResponseCode::FormatZero(_), Some(Kind::Lockout)) => TpmError::Lockout,
        (
            Tss2ResponseCode::FormatZero(_),
            Some(
                Kind::ReferenceH0
                | Kind::ReferenceH1
                | Kind::ReferenceH2
                | Kind::ReferenceH3
                | Kind::ReferenceH4
                | Kind::ReferenceH5
                | Kind::ReferenceH6
                | Kind::ReferenceS0
                | Kind::ReferenceS1
                | Kind::ReferenceS2
                | Kind::ReferenceS3
                | Kind::ReferenceS4
                | Kind::ReferenceS5
                | Kind::ReferenceS6,
            ),
        )
        | (Tss2ResponseCode::FormatOne(_), Some(Kind::Handle)) => {
            TpmError::Stale(format!("{command}: {error}"))
        }
        (Tss2ResponseCode::FormatZero(_), Some(Kind::ObjectMemory | Kind::SessionMemory)) => {
            TpmError::Other(format!(
                "{command}: the TPM has no room for another object or session; other programs \
                 hold its slots (reach the TPM through a resource manager: device:/dev/tpmrm0 \
                 or tabrmd)"
            ))
        }
        (_, Some(_)) => TpmError::Other(format!("{command}: {error}")),
        // tss-esapi has no words for it; its debug form has the number.
        (_, None) => TpmError::Other(format!("{command}: TSS error {code:?}")),
    }
}

fn invalid(what: impl std::fmt::Display) -> TpmError {
    TpmError::Other(format!("the TPM returned {what}"))
}

/// A left-padded 32-byte big-endian integer from a TPM ECC parameter.
fn fixed_32(parameter: &EccParameter) -> Result<[u8; 32], TpmError> {
    let bytes = parameter.value();
    if bytes.len() > 32 {
        return Err(invalid(format!("a {}-byte P-256 coordinate", bytes.len())));
    }
    let mut out = [0u8; 32];
    out[32 - bytes.len()..].copy_from_slice(bytes);
    Ok(out)
}

/// The uncompressed SEC1 point of an ECC public area.
pub(super) fn public_point(public: &Public) -> Result<[u8; POINT_LEN], TpmError> {
    let Public::Ecc { unique, .. } = public else {
        return Err(invalid("a key that is not an ECC key"));
    };
    let mut point = [0u8; POINT_LEN];
    point[0] = 0x04;
    point[1..33].copy_from_slice(&fixed_32(unique.x())?);
    point[33..].copy_from_slice(&fixed_32(unique.y())?);
    Ok(point)
}

/// Checks that `public` is what this store creates for `role`: a P-256 key the
/// TPM generated, that never leaves it (fixedTPM, fixedParent), used with its
/// auth value, for signing or for ECDH only.
pub(super) fn check_runtime_key(public: &Public, role: Role) -> Result<(), String> {
    let Public::Ecc {
        object_attributes: attributes,
        parameters,
        ..
    } = public
    else {
        return Err(format!("the {} is not an ECC key", role.name()));
    };
    let signing = role == Role::Signing;
    let expected = attributes.fixed_tpm()
        && attributes.fixed_parent()
        && attributes.sensitive_data_origin()
        && attributes.user_with_auth()
        && !attributes.restricted()
        && attributes.sign_encrypt() == signing
        && attributes.decrypt() != signing
        && parameters.ecc_curve() == EccCurve::NistP256;
    if expected {
        Ok(())
    } else {
        Err(format!(
            "the {} is not a non-exportable P-256 {} key made by the TPM",
            role.name(),
            if signing { "signing" } else { "ECDH" }
        ))
    }
}

/// The primary key everything hangs from: the TCG's ECC P-256 storage root key
/// template (TCG TPM v2.0 Provisioning Guidance, the "SRK" template), created
/// from the owner hierarchy's seed. The same template gives the same key on the
/// same TPM, so it is never stored.
fn primary_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let zeros = EccParameter::try_from(vec![0u8; 32])?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(zeros.clone(), zeros))
        .build()
}

/// A runtime key: non-exportable P-256, used with its auth value (the cookie),
/// outside dictionary-attack protection (the cookie is 256 random bits, and a
/// process with a wrong cookie must not lock the TPM out for everyone).
fn runtime_template(role: Role) -> Result<Public, tss_esapi::Error> {
    let signing = role == Role::Signing;
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(signing)
        .with_decrypt(!signing)
        .build()?;
    let sha256 = HashScheme::new(HashingAlgorithm::Sha256);
    let parameters = if signing {
        PublicEccParametersBuilder::new_unrestricted_signing_key(
            EccScheme::EcDsa(sha256),
            EccCurve::NistP256,
        )
        .build()?
    } else {
        PublicEccParametersBuilder::new()
            .with_ecc_scheme(EccScheme::EcDh(sha256))
            .with_curve(EccCurve::NistP256)
            .with_is_signing_key(false)
            .with_is_decryption_key(true)
            .with_restricted(false)
            .with_symmetric(SymmetricDefinitionObject::Null)
            .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
            .build()?
    };
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A sealed data object: data only the TPM can unseal, with the auth value.
/// Subject to dictionary-attack protection: the auth value comes from a password.
fn sealed_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

/// A request to the TPM thread.
enum Request {
    /// Create the three runtime keys, with the cookie as their auth value.
    CreateKeys,
    /// Load every runtime key once (checks the blobs belong to this TPM).
    Check,
    /// ECDSA over a SHA-256 digest with the signing key.
    Sign([u8; 32]),
    /// ECDH with an encryption or storage key.
    Ecdh(Role, [u8; POINT_LEN]),
    /// Seal `data` under the primary key with `auth`.
    Seal(AuthValue, Zeroizing<Vec<u8>>),
    /// Unseal a sealed blob with `auth`.
    Unseal(Blob, AuthValue),
}

/// The TPM thread's answer.
enum Response {
    Keys(Box<KeySet>),
    Done,
    Signature([u8; SIGNATURE_LEN]),
    Shared(Zeroizing<[u8; 32]>),
    Sealed(Blob),
    Unsealed(Zeroizing<Vec<u8>>),
}

type Reply = mpsc::SyncSender<Result<Response, TpmError>>;

/// The store's handle on its TPM thread. Dropping it ends the thread, which
/// flushes what it loaded and closes the connection before the drop returns.
pub(super) struct Tpm {
    requests: Option<mpsc::Sender<(Request, Reply)>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Tpm {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            // A panic on that thread has been reported already; nothing to add.
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tpm")
    }
}

impl Tpm {
    /// Starts the TPM thread for `tcti`; the runtime keys use `cookie` as their
    /// auth value and, once known, are the ones in `keys`. Connects lazily.
    pub(super) fn start(
        tcti: TctiNameConf,
        cookie: AuthValue,
        keys: Option<KeySet>,
    ) -> Result<Tpm, TpmError> {
        let (requests, incoming) = mpsc::channel::<(Request, Reply)>();
        let device = Device {
            tcti,
            cookie,
            keys,
            live: None,
        };
        let thread = thread::Builder::new()
            .name("blocktree-tpm".into())
            .spawn(move || device.serve(incoming))
            .map_err(|error| TpmError::Other(format!("cannot start the TPM thread: {error}")))?;
        Ok(Tpm {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    fn call(&self, request: Request) -> Result<Response, TpmError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let gone = || TpmError::Other("the TPM thread has stopped".into());
        let requests = self.requests.as_ref().ok_or_else(gone)?;
        requests.send((request, reply)).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    /// Creates the runtime keys; the thread keeps their blobs from now on.
    pub(super) fn create_keys(&self) -> Result<KeySet, TpmError> {
        match self.call(Request::CreateKeys)? {
            Response::Keys(keys) => Ok(*keys),
            _ => Err(mismatch()),
        }
    }

    /// Connects and loads every runtime key.
    pub(super) fn check(&self) -> Result<(), TpmError> {
        match self.call(Request::Check)? {
            Response::Done => Ok(()),
            _ => Err(mismatch()),
        }
    }

    /// Signs a SHA-256 digest with the signing key; r || s.
    pub(super) fn sign(&self, digest: [u8; 32]) -> Result<[u8; SIGNATURE_LEN], TpmError> {
        match self.call(Request::Sign(digest))? {
            Response::Signature(signature) => Ok(signature),
            _ => Err(mismatch()),
        }
    }

    /// The P-256 shared secret (x-coordinate) of `role`'s key and `point`.
    pub(super) fn ecdh(
        &self,
        role: Role,
        point: [u8; POINT_LEN],
    ) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        match self.call(Request::Ecdh(role, point))? {
            Response::Shared(shared) => Ok(shared),
            _ => Err(mismatch()),
        }
    }

    /// Seals `data` (at most 128 bytes) so that only this TPM, given `auth`,
    /// unseals it.
    pub(super) fn seal(&self, auth: AuthValue, data: Zeroizing<Vec<u8>>) -> Result<Blob, TpmError> {
        match self.call(Request::Seal(auth, data))? {
            Response::Sealed(blob) => Ok(blob),
            _ => Err(mismatch()),
        }
    }

    /// Unseals `blob` with `auth`.
    pub(super) fn unseal(
        &self,
        blob: Blob,
        auth: AuthValue,
    ) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        match self.call(Request::Unseal(blob, auth))? {
            Response::Unsealed(data) => Ok(data),
            _ => Err(mismatch()),
        }
    }
}

fn mismatch() -> TpmError {
    TpmError::Other("the TPM thread answered another request".into())
}

/// What the TPM thread keeps.
struct Device {
    tcti: TctiNameConf,
    cookie: AuthValue,
    keys: Option<KeySet>,
    live: Option<Live>,
}

/// An open connection: the context, the session and what is loaded.
struct Live {
    context: Context,
    session: AuthSession,
    /// Loaded objects, least recently used first.
    resident: Vec<(Object, KeyHandle)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Object {
    Primary,
    Key(Role),
}

/// Which parameters of the next command are encrypted.
#[derive(Clone, Copy)]
enum Protect {
    /// Neither (what the command carries is not secret, or cannot be encrypted).
    Nothing,
    /// The first command parameter (a new object's auth value and data).
    Command,
    /// The first response parameter (ECDH output, unsealed data).
    Response,
}

impl Device {
    fn serve(mut self, incoming: mpsc::Receiver<(Request, Reply)>) {
        while let Ok((request, reply)) = incoming.recv() {
            let connected = self.live.is_some();
            let mut result = self.handle(&request);
            if connected && matches!(result, Err(TpmError::Connect(_) | TpmError::Stale(_))) {
                // The connection broke, or the TPM restarted under it: once more
                // on a fresh connection, with everything loaded again.
                self.abandon();
                result = self.handle(&request);
            }
            if matches!(result, Err(TpmError::Connect(_) | TpmError::Stale(_))) {
                self.abandon();
            }
            // The caller may have given up; nothing to do then.
            let _ = reply.send(result);
        }
    }

    /// Forgets the connection without flushing what it loaded: those handles
    /// are gone, or (on a restarted TPM without a resource manager) may now name
    /// someone else's objects.
    fn abandon(&mut self) {
        if let Some(mut live) = self.live.take() {
            for (_, handle) in live.resident.drain(..) {
                // tss-esapi reports closing a handle it would have flushed as
                // an error, after forgetting it as asked.
                let _ = live.context.tr_close(&mut handle.into());
            }
            let mut session = ObjectHandle::from(SessionHandle::from(live.session));
            let _ = live.context.tr_close(&mut session);
        }
    }

    fn handle(&mut self, request: &Request) -> Result<Response, TpmError> {
        if self.live.is_none() {
            self.live = Some(Live::connect(&self.tcti)?);
        }
        let Some(live) = self.live.as_mut() else {
            return Err(TpmError::Other("no TPM connection".into()));
        };
        match request {
            Request::CreateKeys => {
                let keys = live.create_keys(&self.cookie)?;
                self.keys = Some(keys.clone());
                Ok(Response::Keys(Box::new(keys)))
            }
            Request::Check => {
                let keys = self.keys.as_ref().ok_or_else(no_keys)?;
                for role in Role::ALL {
                    live.ensure_key(role, keys, &self.cookie)?;
                }
                Ok(Response::Done)
            }
            Request::Sign(digest) => {
                let keys = self.keys.as_ref().ok_or_else(no_keys)?;
                let key = live.ensure_key(Role::Signing, keys, &self.cookie)?;
                live.sign(key, digest).map(Response::Signature)
            }
            Request::Ecdh(role, point) => {
                let keys = self.keys.as_ref().ok_or_else(no_keys)?;
                let key = live.ensure_key(*role, keys, &self.cookie)?;
                live.ecdh(key, point).map(Response::Shared)
            }
            Request::Seal(auth, data) => live.seal(auth, data).map(Response::Sealed),
            Request::Unseal(blob, auth) => live.unseal(blob, auth).map(Response::Unsealed),
        }
    }
}

fn no_keys() -> TpmError {
    TpmError::Other("the store has no runtime keys yet".into())
}

fn auth_of(value: &AuthValue) -> Result<Auth, TpmError> {
    Auth::try_from(value.to_vec()).map_err(|error| failed("building an auth value", error))
}

impl Live {
    fn connect(tcti: &TctiNameConf) -> Result<Live, TpmError> {
        let mut context = Context::new(tcti.clone()).map_err(|error| {
            TpmError::Connect(format!("cannot open the TPM: {}", connect_reason(error)))
        })?;
        let primary = create_primary(&mut context)?;
        let session = context
            .start_auth_session(
                Some(primary),
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|error| failed("TPM2_StartAuthSession", error))?
            .ok_or_else(|| invalid("no session"))?;
        let mut live = Live {
            context,
            session,
            resident: vec![(Object::Primary, primary)],
        };
        live.protect(Protect::Nothing)?;
        Ok(live)
    }

    /// Sets the session's attributes for the next command.
    fn protect(&mut self, protect: Protect) -> Result<(), TpmError> {
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(matches!(protect, Protect::Command))
            .with_encrypt(matches!(protect, Protect::Response))
            .build();
        self.context
            .tr_sess_set_attributes(self.session, attributes, mask)
            .map_err(|error| failed("setting the session's attributes", error))
    }

    /// Runs `command` with the salted HMAC session.
    fn with_session<T>(
        &mut self,
        protect: Protect,
        command: impl FnOnce(&mut Context) -> Result<T, tss_esapi::Error>,
        name: &'static str,
    ) -> Result<T, TpmError> {
        self.protect(protect)?;
        let session = self.session;
        self.context
            .execute_with_session(Some(session), command)
            .map_err(|error| failed(name, error))
    }

    /// Flushes least recently used objects until one more fits, sparing `keep`.
    fn make_room(&mut self, keep: Option<Object>) -> Result<(), TpmError> {
        while self.resident.len() >= MAX_RESIDENT {
            let Some(index) = self
                .resident
                .iter()
                .position(|(object, _)| Some(*object) != keep)
            else {
                return Err(TpmError::Other(
                    "no room in the TPM for another object".into(),
                ));
            };
            // Forgotten only once flushed, so that a failed flush leaves it for
            // `abandon` to close.
            let handle = self.resident[index].1;
            self.context
                .flush_context(handle.into())
                .map_err(|error| failed("TPM2_FlushContext", error))?;
            self.resident.remove(index);
        }
        Ok(())
    }

    /// The resident handle of `object`, marked most recently used.
    fn resident(&mut self, object: Object) -> Option<KeyHandle> {
        let index = self.resident.iter().position(|(o, _)| *o == object)?;
        let entry = self.resident.remove(index);
        let handle = entry.1;
        self.resident.push(entry);
        Some(handle)
    }

    /// The handle of the primary key, created if it is not resident.
    fn ensure_primary(&mut self) -> Result<KeyHandle, TpmError> {
        if let Some(handle) = self.resident(Object::Primary) {
            return Ok(handle);
        }
        self.make_room(None)?;
        let handle = create_primary(&mut self.context)?;
        self.resident.push((Object::Primary, handle));
        Ok(handle)
    }

    /// The handle of `role`'s key, loaded (under the primary key) if it is not
    /// resident.
    fn ensure_key(
        &mut self,
        role: Role,
        keys: &KeySet,
        cookie: &AuthValue,
    ) -> Result<KeyHandle, TpmError> {
        if let Some(handle) = self.resident(Object::Key(role)) {
            return Ok(handle);
        }
        let parent = self.ensure_primary()?;
        self.make_room(Some(Object::Primary))?;
        let handle = self.load(parent, &keys[role.index()], role.name())?;
        self.resident.push((Object::Key(role), handle));
        if let Err(error) = self.context.tr_set_auth(handle.into(), auth_of(cookie)?) {
            return Err(failed("setting the key's auth value", error));
        }
        Ok(handle)
    }

    /// TPM2_Load under `parent`. A blob the TPM refuses as such (integrity, size,
    /// value, attributes) is [`TpmError::Foreign`].
    fn load(
        &mut self,
        parent: KeyHandle,
        blob: &Blob,
        what: &'static str,
    ) -> Result<KeyHandle, TpmError> {
        let public = Public::unmarshall(&blob.public).map_err(|_| TpmError::Foreign(what))?;
        let private =
            Private::try_from(blob.private.clone()).map_err(|_| TpmError::Foreign(what))?;
        self.protect(Protect::Nothing)?;
        let session = self.session;
        self.context
            .execute_with_session(Some(session), |context| {
                context.load(parent, private, public)
            })
            .map_err(|error| match error {
                tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatOne(_)) => {
                    TpmError::Foreign(what)
                }
                other => failed("TPM2_Load", other),
            })
    }

    fn create_keys(&mut self, cookie: &AuthValue) -> Result<KeySet, TpmError> {
        let placeholder = || Blob {
            public: Vec::new(),
            private: Vec::new(),
        };
        let mut keys: KeySet = [placeholder(), placeholder(), placeholder()];
        for role in Role::ALL {
            let template = runtime_template(role)
                .map_err(|error| failed("building the key template", error))?;
            keys[role.index()] = self.create(template, cookie, None)?;
        }
        Ok(keys)
    }

    /// TPM2_Create under the primary key.
    fn create(
        &mut self,
        template: Public,
        auth: &AuthValue,
        data: Option<&[u8]>,
    ) -> Result<Blob, TpmError> {
        let parent = self.ensure_primary()?;
        // The TPM builds the new object in an object slot of its own.
        self.make_room(Some(Object::Primary))?;
        let auth = auth_of(auth)?;
        let data = data
            .map(SensitiveData::try_from)
            .transpose()
            .map_err(|error| failed("building the sealed data", error))?;
        let created = self.with_session(
            Protect::Command,
            |context| context.create(parent, template, Some(auth), data, None, None),
            "TPM2_Create",
        )?;
        let public = created
            .out_public
            .marshall()
            .map_err(|error| failed("marshalling a public area", error))?;
        Ok(Blob {
            public,
            private: created.out_private.value().to_vec(),
        })
    }

    fn sign(&mut self, key: KeyHandle, digest: &[u8; 32]) -> Result<[u8; 64], TpmError> {
        let digest = Digest::try_from(digest.to_vec())
            .map_err(|error| failed("building a digest", error))?;
        // A null ticket: the key is not restricted, so the TPM need not have
        // hashed the message itself.
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|error| failed("building a hash check ticket", error))?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let signature = self.with_session(
            Protect::Nothing,
            |context| context.sign(key, digest, scheme, ticket),
            "TPM2_Sign",
        )?;
        let TpmSignature::EcDsa(signature) = signature else {
            return Err(invalid("a signature that is not ECDSA"));
        };
        let mut out = [0u8; SIGNATURE_LEN];
        out[..32].copy_from_slice(&fixed_32(signature.signature_r())?);
        out[32..].copy_from_slice(&fixed_32(signature.signature_s())?);
        Ok(out)
    }

    fn ecdh(
        &mut self,
        key: KeyHandle,
        point: &[u8; POINT_LEN],
    ) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        let coordinate = |bytes: &[u8]| {
            EccParameter::try_from(bytes.to_vec())
                .map_err(|error| failed("building an ECC point", error))
        };
        let point = EccPoint::new(coordinate(&point[1..33])?, coordinate(&point[33..])?);
        let shared = self.with_session(
            Protect::Response,
            |context| context.ecdh_z_gen(key, point),
            "TPM2_ECDH_ZGen",
        )?;
        Ok(Zeroizing::new(fixed_32(shared.x())?))
    }

    fn seal(&mut self, auth: &AuthValue, data: &[u8]) -> Result<Blob, TpmError> {
        let template =
            sealed_template().map_err(|error| failed("building the sealed template", error))?;
        self.create(template, auth, Some(data))
    }

    fn unseal(&mut self, blob: &Blob, auth: &AuthValue) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let parent = self.ensure_primary()?;
        self.make_room(Some(Object::Primary))?;
        let handle = self.load(parent, blob, "sealed root credentials")?;
        let unsealed = (|| {
            self.context
                .tr_set_auth(handle.into(), auth_of(auth)?)
                .map_err(|error| failed("setting the sealed object's auth value", error))?;
            self.with_session(
                Protect::Response,
                |context| context.unseal(handle.into()),
                "TPM2_Unseal",
            )
        })();
        let flushed = self
            .context
            .flush_context(handle.into())
            .map_err(|error| failed("TPM2_FlushContext", error));
        let data = unsealed?;
        flushed?;
        Ok(Zeroizing::new(data.value().to_vec()))
    }
}

fn create_primary(context: &mut Context) -> Result<KeyHandle, TpmError> {
    let template =
        primary_template().map_err(|error| failed("building the primary template", error))?;
    context
        .execute_with_session(Some(AuthSession::Password), |context| {
            context.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .map(|created| created.key_handle)
        .map_err(|error| match failed("TPM2_CreatePrimary", error) {
            TpmError::BadAuth => TpmError::Other(
                "TPM2_CreatePrimary: the TPM's owner hierarchy has a password; this store needs it empty"
                    .into(),
            ),
            other => other,
        })
}

fn connect_reason(error: tss_esapi::Error) -> String {
    match error {
        tss_esapi::Error::Tss2Error(code) if is_tcti_failure(code) => {
            "nothing answers there, or it is not a TPM".into()
        }
        other => other.to_string(),
    }
}
