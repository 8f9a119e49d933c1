//! HPKE (RFC 9180), base mode, single shot: DHKEM(P-256, HKDF-SHA256) with
//! HKDF-SHA256 and AES-GCM.
//!
//! Written here rather than taken from a crate so that the receiver's
//! Diffie-Hellman step is a closure: a file credential store does it with a key in
//! memory, a TPM store with TPM2_ECDH_ZGen, and the private key never has to reach
//! this code. Blocktree seals with AES-256-GCM (suite 0x0010/0x0001/0x0002);
//! AES-128-GCM exists for the RFC's known-answer vectors.

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::hash::HashAlgorithm;
use crate::keys::{CryptoError, EncryptionKeyPair, EncryptionPublicKey};

const KEM_ID: u16 = 0x0010;
const KDF_ID: u16 = 0x0001;
const HASH_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The AEAD of an HPKE suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HpkeAead {
    /// AES-128-GCM (0x0001), for interoperability tests only.
    Aes128Gcm,
    /// AES-256-GCM (0x0002), what Blocktree uses.
    Aes256Gcm,
}

impl HpkeAead {
    fn id(self) -> u16 {
        match self {
            HpkeAead::Aes128Gcm => 0x0001,
            HpkeAead::Aes256Gcm => 0x0002,
        }
    }

    fn key_len(self) -> usize {
        match self {
            HpkeAead::Aes128Gcm => 16,
            HpkeAead::Aes256Gcm => 32,
        }
    }
}

/// An HPKE ciphertext: the encapsulated ephemeral key and the AEAD output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HpkeSealed {
    /// The AEAD the ciphertext was made with.
    pub aead: HpkeAead,
    /// The sender's ephemeral public key (`enc` in RFC 9180).
    pub enc: EncryptionPublicKey,
    /// The ciphertext with its tag.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

fn suite_id_kem() -> [u8; 5] {
    let [a, b] = KEM_ID.to_be_bytes();
    [b'K', b'E', b'M', a, b]
}

fn suite_id_hpke(aead: HpkeAead) -> [u8; 10] {
    let [k0, k1] = KEM_ID.to_be_bytes();
    let [d0, d1] = KDF_ID.to_be_bytes();
    let [a0, a1] = aead.id().to_be_bytes();
    [b'H', b'P', b'K', b'E', k0, k1, d0, d1, a0, a1]
}

fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Zeroizing<Vec<u8>> {
    let prk = HashAlgorithm::Sha256.hmac(salt, &[b"HPKE-v1", suite, label, ikm]);
    Zeroizing::new(prk.as_bytes().to_vec())
}

fn labeled_expand(
    suite: &[u8],
    prk: &[u8],
    label: &[u8],
    info: &[u8],
    len: usize,
) -> Zeroizing<Vec<u8>> {
    // HKDF-Expand (RFC 5869) with the labeled info; every caller asks for at most
    // a few hash lengths, well under the 255 * 32 byte limit.
    let length = (len as u16).to_be_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    let mut previous: Vec<u8> = Vec::new();
    let mut counter = 1u8;
    while out.len() < len {
        let block = HashAlgorithm::Sha256.hmac(
            prk,
            &[
                &previous,
                &length,
                b"HPKE-v1",
                suite,
                label,
                info,
                &[counter],
            ],
        );
        previous = block.as_bytes().to_vec();
        let take = (len - out.len()).min(HASH_LEN);
        out.extend_from_slice(&previous[..take]);
        counter = counter.wrapping_add(1);
    }
    out
}

fn extract_and_expand(dh: &[u8], kem_context: &[u8]) -> Zeroizing<Vec<u8>> {
    let suite = suite_id_kem();
    let eae_prk = labeled_extract(&suite, b"", b"eae_prk", dh);
    labeled_expand(&suite, &eae_prk, b"shared_secret", kem_context, HASH_LEN)
}

/// The keys that base-mode HPKE derives from a shared secret and `info`.
pub(crate) struct Context {
    aead: HpkeAead,
    key: Zeroizing<Vec<u8>>,
    base_nonce: [u8; NONCE_LEN],
    #[cfg_attr(not(test), allow(dead_code))]
    exporter_secret: Zeroizing<Vec<u8>>,
}

impl Context {
    fn new(aead: HpkeAead, shared_secret: &[u8], info: &[u8]) -> Context {
        let suite = suite_id_hpke(aead);
        let psk_id_hash = labeled_extract(&suite, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(&suite, b"", b"info_hash", info);
        let mut context = vec![0u8]; // mode_base
        context.extend_from_slice(&psk_id_hash);
        context.extend_from_slice(&info_hash);
        let secret = labeled_extract(&suite, shared_secret, b"secret", b"");
        let key = labeled_expand(&suite, &secret, b"key", &context, aead.key_len());
        let nonce = labeled_expand(&suite, &secret, b"base_nonce", &context, NONCE_LEN);
        let exporter_secret = labeled_expand(&suite, &secret, b"exp", &context, HASH_LEN);
        let mut base_nonce = [0u8; NONCE_LEN];
        base_nonce.copy_from_slice(&nonce);
        Context {
            aead,
            key,
            base_nonce,
            exporter_secret,
        }
    }

    fn aead_key(&self) -> Result<LessSafeKey, CryptoError> {
        let algorithm = match self.aead {
            HpkeAead::Aes128Gcm => &AES_128_GCM,
            HpkeAead::Aes256Gcm => &AES_256_GCM,
        };
        let unbound = UnboundKey::new(algorithm, &self.key)
            .map_err(|_| CryptoError::Internal("HPKE AEAD key"))?;
        Ok(LessSafeKey::new(unbound))
    }

    fn nonce(&self, sequence: u64) -> Nonce {
        let mut nonce = self.base_nonce;
        for (byte, seq) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(sequence.to_be_bytes())
        {
            *byte ^= seq;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    pub(crate) fn seal(
        &self,
        sequence: u64,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut buffer = plaintext.to_vec();
        self.aead_key()?
            .seal_in_place_append_tag(self.nonce(sequence), Aad::from(aad), &mut buffer)
            .map_err(|_| CryptoError::Internal("HPKE seal"))?;
        Ok(buffer)
    }

    pub(crate) fn open(
        &self,
        sequence: u64,
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if ciphertext.len() < TAG_LEN {
            return Err(CryptoError::DecryptFailed);
        }
        let mut buffer = Zeroizing::new(ciphertext.to_vec());
        let plaintext_len = self
            .aead_key()?
            .open_in_place(self.nonce(sequence), Aad::from(aad), &mut buffer)
            .map_err(|_| CryptoError::DecryptFailed)?
            .len();
        buffer.truncate(plaintext_len);
        Ok(buffer)
    }
}

fn kem_context(enc: &EncryptionPublicKey, recipient: &EncryptionPublicKey) -> Vec<u8> {
    let mut context = Vec::with_capacity(130);
    context.extend_from_slice(enc.as_sec1());
    context.extend_from_slice(recipient.as_sec1());
    context
}

/// Encapsulates to `recipient` with the given ephemeral key pair.
pub(crate) fn setup_sender(
    aead: HpkeAead,
    recipient: &EncryptionPublicKey,
    ephemeral: &EncryptionKeyPair,
    info: &[u8],
) -> Result<Context, CryptoError> {
    let dh = ephemeral.diffie_hellman(recipient)?;
    let shared = extract_and_expand(dh.as_ref(), &kem_context(ephemeral.public(), recipient));
    Ok(Context::new(aead, &shared, info))
}

/// Seals `plaintext` to `recipient` with AES-256-GCM, binding `info` (the purpose)
/// and `aad` (the object it belongs to).
pub fn seal(
    recipient: &EncryptionPublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<HpkeSealed, CryptoError> {
    let ephemeral = EncryptionKeyPair::generate()?;
    let context = setup_sender(HpkeAead::Aes256Gcm, recipient, &ephemeral, info)?;
    Ok(HpkeSealed {
        aead: HpkeAead::Aes256Gcm,
        enc: *ephemeral.public(),
        ciphertext: context.seal(0, aad, plaintext)?,
    })
}

/// Opens `sealed`, addressed to `recipient`. `diffie_hellman` computes the P-256
/// shared secret between the recipient's private key and the given ephemeral
/// public key; it is where a credential store plugs in.
pub fn open<E: From<CryptoError>>(
    recipient: &EncryptionPublicKey,
    diffie_hellman: impl FnOnce(&EncryptionPublicKey) -> Result<Zeroizing<[u8; 32]>, E>,
    sealed: &HpkeSealed,
    info: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, E> {
    let dh = diffie_hellman(&sealed.enc)?;
    let shared = extract_and_expand(dh.as_ref(), &kem_context(&sealed.enc, recipient));
    let context = Context::new(sealed.aead, &shared, info);
    Ok(context.open(0, aad, &sealed.ciphertext)?)
}

/// DeriveKeyPair for DHKEM(P-256) (RFC 9180 §7.1.3): deterministic keys from
/// input keying material, used by the known-answer tests.
pub fn derive_key_pair(ikm: &[u8]) -> Result<EncryptionKeyPair, CryptoError> {
    let suite = suite_id_kem();
    let dkp_prk = labeled_extract(&suite, b"", b"dkp_prk", ikm);
    for counter in 0u8..=255 {
        let candidate = labeled_expand(&suite, &dkp_prk, b"candidate", &[counter], 32);
        // The bitmask for P-256 is 0xff: the candidate is used as is, and rejected
        // when it is zero or not below the group order (aws-lc refuses both).
        if let Ok(pair) = EncryptionKeyPair::from_scalar(&candidate) {
            return Ok(pair);
        }
    }
    Err(CryptoError::Internal(
        "HPKE DeriveKeyPair found no candidate",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vectors(text: &str) -> HashMap<String, Vec<u8>> {
        text.lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| {
                let value = value.trim();
                let bytes = hex::decode(value).unwrap_or_else(|_| value.as_bytes().to_vec());
                (name.trim().to_owned(), bytes)
            })
            .collect()
    }

    fn check_suite(text: &str, aead: HpkeAead) {
        let v = vectors(text);
        let ephemeral = derive_key_pair(&v["ikmE"]).unwrap();
        assert_eq!(
            ephemeral.public().as_sec1().as_slice(),
            v["pkEm"].as_slice()
        );
        assert_eq!(
            ephemeral.to_scalar().unwrap().as_slice(),
            v["skEm"].as_slice()
        );
        let receiver = derive_key_pair(&v["ikmR"]).unwrap();
        assert_eq!(receiver.public().as_sec1().as_slice(), v["pkRm"].as_slice());
        assert_eq!(
            receiver.to_scalar().unwrap().as_slice(),
            v["skRm"].as_slice()
        );
        assert_eq!(ephemeral.public().as_sec1().as_slice(), v["enc"].as_slice());

        let dh = ephemeral.diffie_hellman(receiver.public()).unwrap();
        let shared = extract_and_expand(
            dh.as_ref(),
            &kem_context(ephemeral.public(), receiver.public()),
        );
        assert_eq!(shared.as_slice(), v["shared_secret"].as_slice());

        let sender = setup_sender(aead, receiver.public(), &ephemeral, &v["info"]).unwrap();
        assert_eq!(sender.key.as_slice(), v["key"].as_slice());
        assert_eq!(sender.base_nonce.as_slice(), v["base_nonce"].as_slice());
        assert_eq!(
            sender.exporter_secret.as_slice(),
            v["exporter_secret"].as_slice()
        );

        let receiver_context = {
            let dh = receiver.diffie_hellman(ephemeral.public()).unwrap();
            let shared = extract_and_expand(
                dh.as_ref(),
                &kem_context(ephemeral.public(), receiver.public()),
            );
            Context::new(aead, &shared, &v["info"])
        };
        let mut checked = 0;
        for sequence in 0..3u64 {
            let Some(ct) = v.get(&format!("seq{sequence}_ct")) else {
                continue;
            };
            let pt = &v[&format!("seq{sequence}_pt")];
            let aad = &v[&format!("seq{sequence}_aad")];
            assert_eq!(&sender.seal(sequence, aad, pt).unwrap(), ct);
            assert_eq!(
                receiver_context.open(sequence, aad, ct).unwrap().as_slice(),
                pt.as_slice()
            );
            checked += 1;
        }
        assert!(checked >= 1, "no encryption vectors in the file");
    }

    #[test]
    fn rfc9180_a3_1_known_answers() {
        check_suite(
            include_str!("../tests/vectors/hpke_rfc9180_a3_1.txt"),
            HpkeAead::Aes128Gcm,
        );
    }

    #[test]
    fn p256_sha256_aes256gcm_known_answers() {
        check_suite(
            include_str!("../tests/vectors/hpke_p256_sha256_aes256gcm_base.txt"),
            HpkeAead::Aes256Gcm,
        );
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let receiver = EncryptionKeyPair::generate().unwrap();
        let dh = |enc: &EncryptionPublicKey| receiver.diffie_hellman(enc);
        let sealed = seal(receiver.public(), b"info", b"aad", b"file key").unwrap();
        let opened: Zeroizing<Vec<u8>> =
            open::<CryptoError>(receiver.public(), dh, &sealed, b"info", b"aad").unwrap();
        assert_eq!(opened.as_slice(), b"file key");
        assert!(open::<CryptoError>(receiver.public(), dh, &sealed, b"infx", b"aad").is_err());
        assert!(open::<CryptoError>(receiver.public(), dh, &sealed, b"info", b"aax").is_err());
        let other = EncryptionKeyPair::generate().unwrap();
        let other_dh = |enc: &EncryptionPublicKey| other.diffie_hellman(enc);
        assert!(open::<CryptoError>(other.public(), other_dh, &sealed, b"info", b"aad").is_err());
    }

    /// The independent `hpke` crate opens what we seal, and we open what it seals.
    #[test]
    fn interoperates_with_the_hpke_crate() {
        use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
        type Kem = hpke::kem::DhP256HkdfSha256;
        type Kdf = hpke::kdf::HkdfSha256;
        type Aead = hpke::aead::AesGcm256;

        let receiver = EncryptionKeyPair::generate().unwrap();
        let sk =
            <Kem as hpke::Kem>::PrivateKey::from_bytes(&receiver.to_scalar().unwrap()).unwrap();
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(receiver.public().as_sec1()).unwrap();
        assert_eq!(
            Kem::sk_to_pk(&sk).to_bytes().as_slice(),
            receiver.public().as_sec1()
        );

        let ours = seal(receiver.public(), b"info", b"aad", b"from us").unwrap();
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(ours.enc.as_sec1()).unwrap();
        let theirs_opened = hpke::single_shot_open::<Aead, Kdf, Kem>(
            &OpModeR::Base,
            &sk,
            &enc,
            b"info",
            &ours.ciphertext,
            b"aad",
        )
        .unwrap();
        assert_eq!(theirs_opened, b"from us");

        let (enc, ciphertext) = hpke::single_shot_seal::<Aead, Kdf, Kem>(
            &OpModeS::Base,
            &pk,
            b"info",
            b"from them",
            b"aad",
        )
        .unwrap();
        let sealed = HpkeSealed {
            aead: HpkeAead::Aes256Gcm,
            enc: EncryptionPublicKey::from_sec1(&enc.to_bytes()).unwrap(),
            ciphertext,
        };
        let opened = open::<CryptoError>(
            receiver.public(),
            |e| receiver.diffie_hellman(e),
            &sealed,
            b"info",
            b"aad",
        )
        .unwrap();
        assert_eq!(opened.as_slice(), b"from them");
    }
}
