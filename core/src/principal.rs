//! Principal identifiers: who a key belongs to, as a path component.
//!
//! A principal id is the SHA-256 of a public key's SubjectPublicKeyInfo DER,
//! written as unpadded base64url (43 characters). It names the key without
//! carrying it, so the first component of a path can say which root key vouches
//! for everything beneath it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

use crate::hash::HashAlgorithm;

/// Length of a principal id's text form.
pub const PRINCIPAL_TEXT_LEN: usize = 43;

/// The SHA-256 of a public key's SubjectPublicKeyInfo DER.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PrincipalId([u8; 32]);

/// Why text is not a principal id.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrincipalParseError {
    /// Not 43 characters long.
    #[error("a principal id has {PRINCIPAL_TEXT_LEN} characters, not {0}")]
    Length(usize),
    /// Not canonical unpadded base64url.
    #[error("a principal id is unpadded base64url: {0}")]
    Encoding(String),
}

impl PrincipalId {
    /// The principal that owns the key whose SubjectPublicKeyInfo DER is `spki_der`.
    pub fn from_spki_der(spki_der: &[u8]) -> PrincipalId {
        let digest = HashAlgorithm::Sha256.hash(&[spki_der]);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_bytes());
        PrincipalId(bytes)
    }

    /// The raw 32-byte digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds an id from its raw digest.
    pub fn from_bytes(bytes: [u8; 32]) -> PrincipalId {
        PrincipalId(bytes)
    }
}

impl FromStr for PrincipalId {
    type Err = PrincipalParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != PRINCIPAL_TEXT_LEN {
            return Err(PrincipalParseError::Length(text.len()));
        }
        // The decoder rejects non-zero trailing bits, so every id has one spelling.
        let decoded = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|error| PrincipalParseError::Encoding(error.to_string()))?;
        let bytes: [u8; 32] = decoded
            .try_into()
            .map_err(|_| PrincipalParseError::Encoding("wrong decoded length".into()))?;
        Ok(PrincipalId(bytes))
    }
}

impl fmt::Display for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrincipalId({self})")
    }
}
