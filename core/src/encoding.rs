//! The one binary format for disk and wire (DESIGN decision 6).
//!
//! Every encoded object is `[FORMAT_VERSION][kind][postcard body]`. The version byte
//! lets a later format be told apart; the kind byte stops a well-formed object of
//! one type from being accepted where another is expected (a writecap fed to the
//! metadata decoder fails with [`DecodeError::WrongKind`], not with a confusing
//! field error). Decoding never panics and never allocates more than a small
//! multiple of its input: postcard checks every length against the bytes left.

use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;

/// The format version written first in every encoded object.
pub const FORMAT_VERSION: u8 = 1;

/// Which type an encoded object holds; the second byte of every encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A [`crate::writecap::Writecap`].
    Writecap = 1,
    /// A [`crate::metadata::FileMeta`].
    FileMeta = 2,
    /// A [`crate::merkle::MerkleTree`], the content of a Merkle sector.
    MerkleTree = 3,
    /// A file credential store's runtime credentials.
    RuntimeCreds = 4,
    /// A file credential store's root credentials, sealed under a password.
    RootCreds = 5,
    /// Root credentials exported for another store.
    ExportedRoot = 6,
    /// A [`crate::provision::WritecapRequest`].
    WritecapRequest = 7,
    /// A [`crate::writecap::RevocationList`].
    RevocationList = 8,
    /// The encrypted part of a file's metadata, once opened.
    MetaSecrets = 9,
    /// A [`crate::merkle::MerkleProof`].
    MerkleProof = 10,
    /// A TPM credential store's runtime file: TPM-wrapped key blobs, public keys,
    /// writecap (feature `tpm`).
    TpmRuntimeCreds = 11,
    /// A TPM credential store's root credentials, sealed by the TPM under the root
    /// password (feature `tpm`).
    TpmRootCreds = 12,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        use Kind::*;
        [
            Writecap,
            FileMeta,
            MerkleTree,
            RuntimeCreds,
            RootCreds,
            ExportedRoot,
            WritecapRequest,
            RevocationList,
            MetaSecrets,
            MerkleProof,
            TpmRuntimeCreds,
            TpmRootCreds,
        ]
        .into_iter()
        .find(|kind| *kind as u8 == byte)
    }
}

/// A type with a place in the versioned binary format.
pub trait Encodable: Serialize + DeserializeOwned {
    /// The kind byte written after the version.
    const KIND: Kind;
    /// The largest encoding the decoder accepts; bounds what a hostile peer can make
    /// us parse.
    const MAX_LEN: usize = 1 << 20;
}

/// Why bytes could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than the two header bytes.
    #[error("truncated: {0} bytes is shorter than the 2-byte header")]
    Truncated(usize),
    /// A format version this build does not read.
    #[error("unsupported format version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    /// The object is of another kind than expected.
    #[error("expected a {expected:?}, found kind byte {found}")]
    WrongKind {
        /// The kind the caller asked for.
        expected: Kind,
        /// The kind byte found.
        found: u8,
    },
    /// The input is larger than the type allows.
    #[error("{len} bytes exceeds the {max}-byte limit for a {kind:?}")]
    TooLarge {
        /// The type being decoded.
        kind: Kind,
        /// The input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body does not parse as the expected type.
    #[error("malformed {kind:?}: {reason}")]
    Malformed {
        /// The type being decoded.
        kind: Kind,
        /// What the parser said.
        reason: String,
    },
    /// The body parsed but bytes were left over.
    #[error("{0} trailing bytes after the encoded object")]
    TrailingBytes(usize),
}

/// Encodes `value` with its version and kind header.
pub fn encode<T: Encodable>(value: &T) -> Vec<u8> {
    let out = vec![FORMAT_VERSION, T::KIND as u8];
    // Serializing into a Vec only fails for types whose Serialize impl fails, and
    // none of ours does (no maps with non-string keys, no unknown-length sequences).
    match postcard::to_extend(value, out) {
        Ok(encoded) => encoded,
        Err(error) => unreachable!("serializing a {:?} failed: {error}", T::KIND),
    }
}

/// Decodes a `T` from exactly `bytes`, checking the header, the size limit and that
/// nothing is left over.
pub fn decode<T: Encodable>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > T::MAX_LEN {
        return Err(DecodeError::TooLarge {
            kind: T::KIND,
            len: bytes.len(),
            max: T::MAX_LEN,
        });
    }
    let [version, kind, body @ ..] = bytes else {
        return Err(DecodeError::Truncated(bytes.len()));
    };
    if *version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion(*version));
    }
    if *kind != T::KIND as u8 {
        return Err(DecodeError::WrongKind {
            expected: T::KIND,
            found: *kind,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|error| DecodeError::Malformed {
            kind: T::KIND,
            reason: error.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// Peeks at the kind byte of an encoding, for tools that inspect unknown files.
pub fn kind_of(bytes: &[u8]) -> Option<Kind> {
    match bytes {
        [FORMAT_VERSION, kind, ..] => Kind::from_byte(*kind),
        _ => None,
    }
}
