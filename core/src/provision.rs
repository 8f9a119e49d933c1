//! Provisioning: how a runtime obtains its writecap (the original `btprovision`).
//!
//! A runtime makes a [`WritecapRequest`] with its public keys and the path it
//! would like, signed with its own key to prove it holds it. An operator with root
//! credentials, or with a writecap that covers the path, [`approve`]s it, which
//! issues a writecap; the runtime imports that into its credential store.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::credstore::{CredStore, CredStoreError};
use crate::encoding::{Encodable, Kind};
use crate::keys::{CryptoError, EncryptionPublicKey, Signature, Signer, SigningPublicKey};
use crate::path::BtPath;
use crate::principal::PrincipalId;
use crate::time::Timestamp;
use crate::writecap::{Writecap, WritecapError};

const SIGNING_CONTEXT: &[u8] = b"blocktree writecap request v1\0";

/// A runtime's request for a writecap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritecapRequest {
    /// The runtime's signing key.
    pub signing_key: SigningPublicKey,
    /// The runtime's encryption key, for readcaps it may later be granted.
    pub encryption_key: EncryptionPublicKey,
    /// Where the runtime would like authority; advisory.
    pub path: Option<BtPath>,
    /// The runtime's signature over the fields above.
    pub signature: Signature,
}

impl Encodable for WritecapRequest {
    const KIND: Kind = Kind::WritecapRequest;
    const MAX_LEN: usize = 16 * 1024;
}

/// Why a request could not be made or approved.
#[derive(Debug, Error)]
pub enum ProvisionError {
    /// The request's self-signature does not verify.
    #[error("the writecap request's signature does not verify: it was altered or forged")]
    BadRequestSignature,
    /// The request names no path and none was given.
    #[error("the request names no path; give one to approve it for")]
    NoPath,
    /// Issuing failed (outside the approver's authority, expiry, …).
    #[error(transparent)]
    Writecap(#[from] WritecapError),
    /// The credential store failed.
    #[error(transparent)]
    Store(#[from] CredStoreError),
    /// A cryptographic failure.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

#[derive(Serialize)]
struct SignedFields<'a> {
    signing_key: &'a SigningPublicKey,
    encryption_key: &'a EncryptionPublicKey,
    path: &'a Option<BtPath>,
}

fn signed_bytes(
    signing_key: &SigningPublicKey,
    encryption_key: &EncryptionPublicKey,
    path: &Option<BtPath>,
) -> Vec<u8> {
    let fields = SignedFields {
        signing_key,
        encryption_key,
        path,
    };
    match postcard::to_extend(&fields, SIGNING_CONTEXT.to_vec()) {
        Ok(bytes) => bytes,
        Err(error) => unreachable!("serializing a request failed: {error}"),
    }
}

impl WritecapRequest {
    /// A request for the runtime credentials in `store`, for `path`.
    pub fn new(
        store: &dyn CredStore,
        path: Option<BtPath>,
    ) -> Result<WritecapRequest, ProvisionError> {
        let signing_key = store.signing_public_key();
        let encryption_key = store.encryption_public_key();
        let signature = store.sign(&signed_bytes(&signing_key, &encryption_key, &path))?;
        Ok(WritecapRequest {
            signing_key,
            encryption_key,
            path,
            signature,
        })
    }

    /// Checks the request was signed by the key it carries.
    pub fn verify(&self) -> Result<(), ProvisionError> {
        self.signing_key
            .verify(
                &signed_bytes(&self.signing_key, &self.encryption_key, &self.path),
                &self.signature,
            )
            .map_err(|_| ProvisionError::BadRequestSignature)
    }

    /// The requesting runtime's principal.
    pub fn principal(&self) -> PrincipalId {
        self.signing_key.principal()
    }
}

/// Issues a writecap for `request` over `path` (or the path it asked for) until
/// `expires`, signed by `approver`: the root key when `approver_writecap` is
/// `None`, else a delegate whose writecap must cover the path and outlive the
/// grant.
pub fn approve(
    request: &WritecapRequest,
    approver: &dyn Signer,
    approver_writecap: Option<&Writecap>,
    path: Option<BtPath>,
    expires: Timestamp,
    now: Timestamp,
) -> Result<Writecap, ProvisionError> {
    request.verify()?;
    let path = path
        .or_else(|| request.path.clone())
        .ok_or(ProvisionError::NoPath)?;
    Ok(Writecap::issue(
        approver,
        approver_writecap,
        request.principal(),
        path,
        expires,
        now,
    )?)
}
