//! Hash algorithms and digests (SHA-256 and SHA-512), and HMAC over them.
//!
//! Backed by aws-lc-rs, whose SHA-2 assembly uses SHA-NI where the CPU has it.
//! [`HashAlgorithm::hash_many`] hashes a batch of SHA-256 messages with their SHA-NI
//! rounds interleaved ([`interleaved`]), which one stream cannot do.

#[cfg(target_arch = "x86_64")]
mod interleaved;

use aws_lc_rs::{digest, hmac};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The hash function of a Merkle tree or an HMAC-keyed table, fixed per file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashAlgorithm {
    /// SHA-256, the default.
    #[default]
    Sha256,
    /// SHA-512.
    Sha512,
}

/// The longest digest any [`HashAlgorithm`] produces.
pub const MAX_DIGEST_LEN: usize = 64;

impl HashAlgorithm {
    /// The stable one-byte identifier written into readcap table keys.
    pub fn id(self) -> u8 {
        match self {
            HashAlgorithm::Sha256 => 1,
            HashAlgorithm::Sha512 => 2,
        }
    }

    /// The algorithm with identifier `id`.
    pub fn from_id(id: u8) -> Option<HashAlgorithm> {
        match id {
            1 => Some(HashAlgorithm::Sha256),
            2 => Some(HashAlgorithm::Sha512),
            _ => None,
        }
    }

    /// Digest length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlgorithm::Sha256 => 32,
            HashAlgorithm::Sha512 => 64,
        }
    }

    fn digest_algorithm(self) -> &'static digest::Algorithm {
        match self {
            HashAlgorithm::Sha256 => &digest::SHA256,
            HashAlgorithm::Sha512 => &digest::SHA512,
        }
    }

    fn hmac_algorithm(self) -> hmac::Algorithm {
        match self {
            HashAlgorithm::Sha256 => hmac::HMAC_SHA256,
            HashAlgorithm::Sha512 => hmac::HMAC_SHA512,
        }
    }

    /// Hashes the concatenation of `parts`.
    pub fn hash(self, parts: &[&[u8]]) -> Digest {
        let mut context = digest::Context::new(self.digest_algorithm());
        for part in parts {
            context.update(part);
        }
        Digest::from_slice(self, context.finish().as_ref())
    }

    /// The digest of each message, a message being the concatenation of its parts:
    /// what [`hash`](Self::hash) gives for each, computed together.
    ///
    /// SHA-256 messages are hashed several at a time with their SHA-NI rounds
    /// interleaved where the CPU has SHA-NI, so a batch (a commit's sector records)
    /// hashes faster than one message after another.
    pub fn hash_many(self, messages: &[&[&[u8]]]) -> Vec<Digest> {
        #[cfg(target_arch = "x86_64")]
        if self == HashAlgorithm::Sha256 && messages.len() > 1 && interleaved::available() {
            return interleaved::digests(messages)
                .iter()
                .map(|digest| Digest::from_slice(self, digest))
                .collect();
        }
        messages.iter().map(|parts| self.hash(parts)).collect()
    }

    /// HMAC of the concatenation of `parts` under `key`.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Digest {
        let key = hmac::Key::new(self.hmac_algorithm(), key);
        let mut context = hmac::Context::with_key(&key);
        for part in parts {
            context.update(part);
        }
        Digest::from_slice(self, context.sign().as_ref())
    }
}

/// A digest of one of the [`HashAlgorithm`]s; compares in constant time.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(try_from = "DigestRepr", into = "DigestRepr")]
pub struct Digest {
    algorithm: HashAlgorithm,
    bytes: [u8; MAX_DIGEST_LEN],
}

#[derive(Serialize, Deserialize)]
struct DigestRepr {
    algorithm: HashAlgorithm,
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

impl TryFrom<DigestRepr> for Digest {
    type Error = String;
    fn try_from(repr: DigestRepr) -> Result<Self, Self::Error> {
        if repr.bytes.len() != repr.algorithm.output_len() {
            return Err(format!(
                "a {:?} digest has {} bytes, not {}",
                repr.algorithm,
                repr.algorithm.output_len(),
                repr.bytes.len()
            ));
        }
        Ok(Digest::from_slice(repr.algorithm, &repr.bytes))
    }
}

impl From<Digest> for DigestRepr {
    fn from(digest: Digest) -> Self {
        DigestRepr {
            algorithm: digest.algorithm,
            bytes: digest.as_bytes().to_vec(),
        }
    }
}

impl Digest {
    /// Wraps `bytes`, which must be exactly `algorithm.output_len()` long.
    ///
    /// # Panics
    /// If the length is wrong: callers pass digests they just computed.
    pub fn from_slice(algorithm: HashAlgorithm, bytes: &[u8]) -> Digest {
        assert_eq!(bytes.len(), algorithm.output_len(), "digest length");
        let mut buffer = [0u8; MAX_DIGEST_LEN];
        buffer[..bytes.len()].copy_from_slice(bytes);
        Digest {
            algorithm,
            bytes: buffer,
        }
    }

    /// The algorithm that produced this digest.
    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.algorithm.output_len()]
    }
}

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        self.algorithm == other.algorithm
            && aws_lc_rs::constant_time::verify_slices_are_equal(self.as_bytes(), other.as_bytes())
                .is_ok()
    }
}

impl Eq for Digest {}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}:", self.algorithm)?;
        for byte in self.as_bytes() {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}
