//! AES-256-GCM for small secrets: wrapped keys, sealed metadata, sealed stores.
//!
//! Every call draws a fresh random 96-bit nonce; the output is
//! `nonce || ciphertext || tag`. Keys used here seal a handful of objects over
//! their lifetime, far below the 2^32 random-nonce bound. Bulk sector data has its
//! own path with nonce accounting in [`crate::sector`].

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand;
use std::fmt;
use zeroize::Zeroizing;

use crate::keys::CryptoError;

/// Length of an AES-256 key.
pub const KEY_LEN: usize = 32;
/// Length of the GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// A 256-bit symmetric key, wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SymmetricKey(Zeroizing<[u8; KEY_LEN]>);

impl SymmetricKey {
    /// A fresh random key.
    pub fn generate() -> Result<SymmetricKey, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        random_fill(key.as_mut())?;
        Ok(SymmetricKey(key))
    }

    /// A key from its bytes; `None` unless exactly [`KEY_LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<SymmetricKey> {
        let key: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(SymmetricKey(Zeroizing::new(key)))
    }

    /// The key bytes, for wrapping under another key.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn aead_key(&self) -> Result<LessSafeKey, CryptoError> {
        let unbound = UnboundKey::new(&AES_256_GCM, self.0.as_ref())
            .map_err(|_| CryptoError::Internal("AES-256-GCM key setup"))?;
        Ok(LessSafeKey::new(unbound))
    }

    /// Encrypts `plaintext`, binding `aad`; returns nonce || ciphertext || tag.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce)?;
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .aead_key()?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| CryptoError::Internal("AES-256-GCM seal"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts what [`SymmetricKey::seal`] produced with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(CryptoError::DecryptFailed);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::DecryptFailed)?;
        let mut plaintext = Zeroizing::new(vec![0u8; ciphertext.len()]);
        self.aead_key()?
            .open_separate_gather(nonce, Aad::from(aad), ciphertext, tag, &mut plaintext)
            .map_err(|_| CryptoError::DecryptFailed)?;
        Ok(plaintext)
    }
}

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SymmetricKey(<secret>)")
    }
}

/// Fills `buffer` from the operating system's CSPRNG (through aws-lc).
pub fn random_fill(buffer: &mut [u8]) -> Result<(), CryptoError> {
    rand::fill(buffer).map_err(|_| CryptoError::Internal("random number generator"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let key = SymmetricKey::generate().unwrap();
        let sealed = key.seal(b"aad", b"secret").unwrap();
        assert_eq!(key.open(b"aad", &sealed).unwrap().as_slice(), b"secret");
        assert_eq!(key.open(b"aae", &sealed), Err(CryptoError::DecryptFailed));
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x80;
            assert_eq!(key.open(b"aad", &tampered), Err(CryptoError::DecryptFailed));
        }
        assert_eq!(
            key.open(b"aad", &sealed[..10]),
            Err(CryptoError::DecryptFailed)
        );
        let other = SymmetricKey::generate().unwrap();
        assert_eq!(other.open(b"aad", &sealed), Err(CryptoError::DecryptFailed));
    }
}
