//! P-256 keys: ECDSA signing keys and HPKE encryption keys.
//!
//! Public keys are kept as 65-byte uncompressed SEC1 points, the form a TPM, X.509
//! and HPKE's DHKEM(P-256) all speak, and are validated (on the curve, not the
//! identity) whenever they are built from bytes. Private keys never leave this
//! crate except as PKCS#8 / big-endian scalars handed to a credential store, which
//! keeps them at rest.

use aws_lc_rs::agreement;
use aws_lc_rs::encoding::{AsBigEndian, EcPrivateKeyBin};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, ParsedPublicKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::principal::PrincipalId;

/// Length of an uncompressed SEC1 P-256 point.
pub const POINT_LEN: usize = 65;
/// Length of a fixed-width (r || s) P-256 ECDSA signature.
pub const SIGNATURE_LEN: usize = 64;

/// The DER that precedes the point in a P-256 SubjectPublicKeyInfo:
/// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes) }.
const SPKI_P256_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A failed cryptographic operation; deliberately says no more than which one.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// Bytes that are not a valid P-256 public key.
    #[error("not a valid P-256 public key")]
    InvalidPublicKey,
    /// Bytes that are not a valid private key.
    #[error("not a valid P-256 private key")]
    InvalidPrivateKey,
    /// A signature that does not verify.
    #[error("signature verification failed")]
    BadSignature,
    /// Authenticated decryption failed: wrong key, or tampered data.
    #[error("decryption failed: wrong key or tampered ciphertext")]
    DecryptFailed,
    /// A primitive failed for an internal reason (RNG, key generation).
    #[error("cryptographic operation failed: {0}")]
    Internal(&'static str),
    /// The key's holder (a credential store, a TPM) could not perform the operation.
    #[error("credential store failed: {0}")]
    Backend(String),
}

fn validate_point(bytes: &[u8]) -> Result<[u8; POINT_LEN], CryptoError> {
    let point: [u8; POINT_LEN] = bytes
        .try_into()
        .map_err(|_| CryptoError::InvalidPublicKey)?;
    if point[0] != 0x04 {
        return Err(CryptoError::InvalidPublicKey);
    }
    ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .map_err(|_| CryptoError::InvalidPublicKey)?;
    Ok(point)
}

macro_rules! public_key_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "serde_bytes::ByteBuf", into = "serde_bytes::ByteBuf")]
        pub struct $name([u8; POINT_LEN]);

        impl $name {
            /// Parses and validates an uncompressed SEC1 point.
            pub fn from_sec1(bytes: &[u8]) -> Result<Self, CryptoError> {
                validate_point(bytes).map($name)
            }

            /// The uncompressed SEC1 point.
            pub fn as_sec1(&self) -> &[u8; POINT_LEN] {
                &self.0
            }

            /// The X.509 SubjectPublicKeyInfo DER of this key.
            pub fn spki_der(&self) -> Vec<u8> {
                let mut der = Vec::with_capacity(SPKI_P256_PREFIX.len() + POINT_LEN);
                der.extend_from_slice(&SPKI_P256_PREFIX);
                der.extend_from_slice(&self.0);
                der
            }

            /// The principal that owns this key.
            pub fn principal(&self) -> PrincipalId {
                PrincipalId::from_spki_der(&self.spki_der())
            }
        }

        impl TryFrom<serde_bytes::ByteBuf> for $name {
            type Error = CryptoError;
            fn try_from(bytes: serde_bytes::ByteBuf) -> Result<Self, Self::Error> {
                $name::from_sec1(&bytes)
            }
        }

        impl From<$name> for serde_bytes::ByteBuf {
            fn from(key: $name) -> Self {
                serde_bytes::ByteBuf::from(key.0.to_vec())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.principal())
            }
        }
    };
}

public_key_type!(
    /// An ECDSA P-256 verifying key.
    SigningPublicKey
);
public_key_type!(
    /// A P-256 key that receives HPKE-wrapped secrets (readcaps, exported roots).
    EncryptionPublicKey
);

impl SigningPublicKey {
    /// Checks `signature` over `message` (ECDSA P-256 with SHA-256).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), CryptoError> {
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.0)
            .verify(message, &signature.0)
            .map_err(|_| CryptoError::BadSignature)
    }
}

/// A fixed-width ECDSA P-256 signature, r || s.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_bytes::ByteBuf", into = "serde_bytes::ByteBuf")]
pub struct Signature([u8; SIGNATURE_LEN]);

impl Signature {
    /// Wraps r || s.
    pub fn from_bytes(bytes: [u8; SIGNATURE_LEN]) -> Signature {
        Signature(bytes)
    }

    /// The r || s bytes.
    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.0
    }
}

impl TryFrom<serde_bytes::ByteBuf> for Signature {
    type Error = String;
    fn try_from(bytes: serde_bytes::ByteBuf) -> Result<Self, Self::Error> {
        let bytes: [u8; SIGNATURE_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("a signature has {SIGNATURE_LEN} bytes"))?;
        Ok(Signature(bytes))
    }
}

impl From<Signature> for serde_bytes::ByteBuf {
    fn from(signature: Signature) -> Self {
        serde_bytes::ByteBuf::from(signature.0.to_vec())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// Anything that can sign with one P-256 key: a key in memory, a credential
/// store's runtime key, an unlocked root key, a TPM.
pub trait Signer {
    /// The key that verifies this signer's signatures.
    fn public_key(&self) -> SigningPublicKey;
    /// Signs `message` (ECDSA P-256 with SHA-256).
    fn sign(&self, message: &[u8]) -> Result<Signature, CryptoError>;
    /// The principal this signer speaks for.
    fn principal(&self) -> PrincipalId {
        self.public_key().principal()
    }
    /// Whether a signature just made by this signer verifies under
    /// [`Signer::public_key`] by construction, so that checking it again in the
    /// same process would only repeat the arithmetic: true for a key pair held
    /// in this process, whose public key is derived from its private key; false
    /// (the default) for signers outside it, such as a TPM, whose signatures are
    /// checked like anyone's.
    fn signs_in_process(&self) -> bool {
        false
    }
}

impl Signer for SigningKeyPair {
    fn public_key(&self) -> SigningPublicKey {
        self.public
    }
    fn sign(&self, message: &[u8]) -> Result<Signature, CryptoError> {
        SigningKeyPair::sign(self, message)
    }
    fn signs_in_process(&self) -> bool {
        true
    }
}

/// An ECDSA P-256 key pair held in memory.
pub struct SigningKeyPair {
    inner: EcdsaKeyPair,
    public: SigningPublicKey,
}

impl SigningKeyPair {
    /// Generates a fresh key pair.
    pub fn generate() -> Result<SigningKeyPair, CryptoError> {
        let inner = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| CryptoError::Internal("ECDSA key generation"))?;
        Self::wrap(inner)
    }

    /// Loads a key pair from its PKCS#8 v1 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKeyPair, CryptoError> {
        let inner = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| CryptoError::InvalidPrivateKey)?;
        Self::wrap(inner)
    }

    fn wrap(inner: EcdsaKeyPair) -> Result<SigningKeyPair, CryptoError> {
        let public = SigningPublicKey::from_sec1(inner.public_key().as_ref())?;
        Ok(SigningKeyPair { inner, public })
    }

    /// The PKCS#8 v1 DER of the private key, for a credential store to keep.
    pub fn to_pkcs8(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let document = self
            .inner
            .to_pkcs8v1()
            .map_err(|_| CryptoError::Internal("PKCS#8 export"))?;
        Ok(Zeroizing::new(document.as_ref().to_vec()))
    }

    /// The public half.
    pub fn public(&self) -> &SigningPublicKey {
        &self.public
    }

    /// Signs `message` (ECDSA P-256 with SHA-256, fixed-width output).
    pub fn sign(&self, message: &[u8]) -> Result<Signature, CryptoError> {
        let signature = self
            .inner
            .sign(&SystemRandom::new(), message)
            .map_err(|_| CryptoError::Internal("ECDSA signing"))?;
        let bytes: [u8; SIGNATURE_LEN] = signature
            .as_ref()
            .try_into()
            .map_err(|_| CryptoError::Internal("ECDSA signature length"))?;
        Ok(Signature(bytes))
    }
}

impl fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKeyPair({})", self.public.principal())
    }
}

/// A P-256 key pair for receiving HPKE-wrapped secrets, held in memory.
pub struct EncryptionKeyPair {
    private: agreement::PrivateKey,
    public: EncryptionPublicKey,
}

impl EncryptionKeyPair {
    /// Generates a fresh key pair.
    pub fn generate() -> Result<EncryptionKeyPair, CryptoError> {
        let private = agreement::PrivateKey::generate(&agreement::ECDH_P256)
            .map_err(|_| CryptoError::Internal("ECDH key generation"))?;
        Self::wrap(private)
    }

    /// Loads a key pair from its 32-byte big-endian private scalar.
    pub fn from_scalar(scalar: &[u8]) -> Result<EncryptionKeyPair, CryptoError> {
        let private = agreement::PrivateKey::from_private_key(&agreement::ECDH_P256, scalar)
            .map_err(|_| CryptoError::InvalidPrivateKey)?;
        Self::wrap(private)
    }

    fn wrap(private: agreement::PrivateKey) -> Result<EncryptionKeyPair, CryptoError> {
        let public = private
            .compute_public_key()
            .map_err(|_| CryptoError::Internal("ECDH public key"))?;
        let public = EncryptionPublicKey::from_sec1(public.as_ref())?;
        Ok(EncryptionKeyPair { private, public })
    }

    /// The 32-byte big-endian private scalar, for a credential store to keep.
    pub fn to_scalar(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let scalar: EcPrivateKeyBin<'_> = self
            .private
            .as_be_bytes()
            .map_err(|_| CryptoError::Internal("ECDH private key export"))?;
        Ok(Zeroizing::new(scalar.as_ref().to_vec()))
    }

    /// The public half.
    pub fn public(&self) -> &EncryptionPublicKey {
        &self.public
    }

    /// The P-256 Diffie-Hellman shared secret (the x-coordinate) with `peer`.
    pub fn diffie_hellman(
        &self,
        peer: &EncryptionPublicKey,
    ) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, peer.as_sec1());
        agreement::agree(
            &self.private,
            peer,
            CryptoError::InvalidPublicKey,
            |shared| {
                let mut out = Zeroizing::new([0u8; 32]);
                if shared.len() != 32 {
                    return Err(CryptoError::Internal("ECDH output length"));
                }
                out.copy_from_slice(shared);
                Ok(out)
            },
        )
    }
}

impl fmt::Debug for EncryptionKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKeyPair({})", self.public.principal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};

    #[test]
    fn spki_matches_aws_lc() {
        let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let der: PublicKeyX509Der<'_> = pair.public_key().as_der().unwrap();
        let ours = SigningPublicKey::from_sec1(pair.public_key().as_ref()).unwrap();
        assert_eq!(ours.spki_der(), der.as_ref());
    }

    #[test]
    fn sign_verify_and_tamper() {
        let pair = SigningKeyPair::generate().unwrap();
        let signature = pair.sign(b"message").unwrap();
        pair.public().verify(b"message", &signature).unwrap();
        assert_eq!(
            pair.public().verify(b"messagf", &signature),
            Err(CryptoError::BadSignature)
        );
        let reloaded = SigningKeyPair::from_pkcs8(&pair.to_pkcs8().unwrap()).unwrap();
        assert_eq!(reloaded.public(), pair.public());
    }

    #[test]
    fn rejects_points_off_the_curve() {
        let pair = SigningKeyPair::generate().unwrap();
        let mut point = *pair.public().as_sec1();
        point[40] ^= 1;
        assert_eq!(
            SigningPublicKey::from_sec1(&point),
            Err(CryptoError::InvalidPublicKey)
        );
        assert!(SigningPublicKey::from_sec1(&point[..64]).is_err());
    }

    #[test]
    fn diffie_hellman_agrees() {
        let a = EncryptionKeyPair::generate().unwrap();
        let b = EncryptionKeyPair::generate().unwrap();
        assert_eq!(
            *a.diffie_hellman(b.public()).unwrap(),
            *b.diffie_hellman(a.public()).unwrap()
        );
        let reloaded = EncryptionKeyPair::from_scalar(&a.to_scalar().unwrap()).unwrap();
        assert_eq!(reloaded.public(), a.public());
    }
}
