//! Keys derived from passwords with Argon2id.
//!
//! The parameters travel with what they protect, so they can be raised later;
//! decoding rejects parameters outside sane bounds, so a tampered file cannot make
//! us allocate gigabytes or spin for hours before the password check fails.

use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use crate::aead::SymmetricKey;
use crate::credstore::CredStoreError;

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: RFC 9106's second recommendation, with one lane
    /// because an appliance may have few cores.
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

impl KdfParams {
    /// The largest memory cost accepted from a file: 1 GiB.
    pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;
    /// The most passes accepted from a file.
    pub const MAX_ITERATIONS: u32 = 64;
    /// The most lanes accepted from a file.
    pub const MAX_PARALLELISM: u32 = 16;

    /// Checks the parameters are within the accepted bounds.
    pub fn check(&self) -> Result<(), CredStoreError> {
        let in_range = (1..=Self::MAX_PARALLELISM).contains(&self.parallelism)
            && (1..=Self::MAX_ITERATIONS).contains(&self.iterations)
            && (8 * self.parallelism..=Self::MAX_MEMORY_KIB).contains(&self.memory_kib);
        if in_range {
            Ok(())
        } else {
            Err(CredStoreError::KdfParams(format!(
                "{self:?} is outside 1..={} lanes, 1..={} passes, 8*lanes..={} KiB",
                Self::MAX_PARALLELISM,
                Self::MAX_ITERATIONS,
                Self::MAX_MEMORY_KIB
            )))
        }
    }

    /// Derives a 256-bit key from `password` and `salt`.
    pub fn derive(&self, password: &str, salt: &[u8]) -> Result<SymmetricKey, CredStoreError> {
        self.check()?;
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|error| CredStoreError::KdfParams(error.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(password.as_bytes(), salt, key.as_mut())
            .map_err(|error| CredStoreError::KdfParams(error.to_string()))?;
        SymmetricKey::from_slice(key.as_ref())
            .ok_or_else(|| CredStoreError::KdfParams("derived key length".into()))
    }
}
