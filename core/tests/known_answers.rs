//! Published known-answer vectors through Blocktree's own wrappers: AES-256-GCM
//! (`SymmetricKey::open`), SHA-256/512 and HMAC-SHA-256 (`HashAlgorithm`), and
//! ECDSA P-256 verification (`SigningPublicKey::verify`). The vector files in
//! `tests/vectors/` name their sources.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use blocktree_core::aead::SymmetricKey;
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::keys::{CryptoError, EncryptionKeyPair, Signature, SigningPublicKey};

const AES_256_GCM: &str = include_str!("vectors/aes256gcm.txt");
const SHA2: &str = include_str!("vectors/sha2.txt");
const HMAC_SHA256: &str = include_str!("vectors/hmac_sha256.txt");
const ECDSA_P256_SHA256: &str = include_str!("vectors/ecdsa_p256_sha256.txt");

/// One vector: `name = value` lines between blank lines; `#` lines are comments.
type Block = HashMap<String, String>;

fn blocks(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut current = Block::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if line.is_empty() {
            if !current.is_empty() {
                blocks.push(std::mem::take(&mut current));
            }
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a 'name = value' line: {line}"));
        let previous = current.insert(name.trim().to_owned(), value.trim().to_owned());
        assert!(previous.is_none(), "{} given twice", name.trim());
    }
    if !current.is_empty() {
        blocks.push(current);
    }
    blocks
}

fn field<'a>(block: &'a Block, name: &str) -> &'a str {
    block
        .get(name)
        .unwrap_or_else(|| panic!("vector without '{name}': {block:?}"))
}

fn hex_field(block: &Block, name: &str) -> Vec<u8> {
    hex::decode(field(block, name)).unwrap()
}

/// Hashes `message` in one part and split in three, which must agree.
fn hash_both_ways(algorithm: HashAlgorithm, message: &[u8]) -> Vec<u8> {
    let whole = algorithm.hash(&[message]);
    let (a, rest) = message.split_at(message.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    assert_eq!(algorithm.hash(&[a, b, c]), whole, "split input");
    assert_eq!(whole.algorithm(), algorithm);
    assert_eq!(whole.as_bytes().len(), algorithm.output_len());
    whole.as_bytes().to_vec()
}

#[test]
fn aes_256_gcm_vectors_open() {
    let vectors = blocks(AES_256_GCM);
    assert_eq!(vectors.len(), 6, "every vector in the file was read");
    for (number, block) in vectors.iter().enumerate() {
        let key = SymmetricKey::from_slice(&hex_field(block, "key")).unwrap();
        let iv = hex_field(block, "iv");
        let aad = hex_field(block, "aad");
        let plaintext = hex_field(block, "pt");
        let ciphertext = hex_field(block, "ct");
        let tag = hex_field(block, "tag");
        assert_eq!(iv.len(), 12);
        assert_eq!(tag.len(), 16);
        assert_eq!(ciphertext.len(), plaintext.len());
        let sealed = [iv, ciphertext, tag].concat();

        let opened = key.open(&aad, &sealed).unwrap();
        assert_eq!(opened.as_slice(), plaintext.as_slice(), "vector {number}");

        let mut bad_tag = sealed.clone();
        *bad_tag.last_mut().unwrap() ^= 0x01;
        assert_eq!(key.open(&aad, &bad_tag), Err(CryptoError::DecryptFailed));
        let mut bad_iv = sealed.clone();
        bad_iv[0] ^= 0x01;
        assert_eq!(key.open(&aad, &bad_iv), Err(CryptoError::DecryptFailed));
        if !plaintext.is_empty() {
            let mut bad_ciphertext = sealed.clone();
            bad_ciphertext[12] ^= 0x80;
            assert_eq!(
                key.open(&aad, &bad_ciphertext),
                Err(CryptoError::DecryptFailed)
            );
        }
        let other_aad = [aad.as_slice(), b"x"].concat();
        assert_eq!(
            key.open(&other_aad, &sealed),
            Err(CryptoError::DecryptFailed)
        );
    }
}

#[test]
fn aes_256_gcm_rejects_wrong_key_lengths() {
    assert!(SymmetricKey::from_slice(&[0; 31]).is_none());
    assert!(SymmetricKey::from_slice(&[0; 33]).is_none());
    assert!(SymmetricKey::from_slice(&[0; 16]).is_none());
}

#[test]
fn sha2_vectors() {
    let vectors = blocks(SHA2);
    assert_eq!(vectors.len(), 9, "every vector in the file was read");
    for block in &vectors {
        let algorithm = match field(block, "alg") {
            "sha256" => HashAlgorithm::Sha256,
            "sha512" => HashAlgorithm::Sha512,
            other => panic!("unknown algorithm {other}"),
        };
        let message = match (block.get("msg"), block.get("msg_repeat")) {
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(repeat)) => {
                let (unit, count) = repeat.split_once(" x ").unwrap();
                unit.repeat(count.parse().unwrap()).into_bytes()
            }
            _ => panic!("a vector has exactly one of msg and msg_repeat: {block:?}"),
        };
        assert_eq!(
            hash_both_ways(algorithm, &message),
            hex_field(block, "digest"),
            "{algorithm:?} of {} bytes",
            message.len()
        );
    }
    assert!(
        vectors
            .iter()
            .any(|block| block.get("msg_repeat").map(String::as_str) == Some("a x 1000000")),
        "the one-million-'a' vector is present"
    );
}

#[test]
fn hmac_sha256_rfc4231_vectors() {
    let vectors = blocks(HMAC_SHA256);
    assert_eq!(vectors.len(), 6, "every vector in the file was read");
    for (number, block) in vectors.iter().enumerate() {
        let key = hex_field(block, "key");
        let data = hex_field(block, "data");
        let expected = hex_field(block, "mac");
        let mac = HashAlgorithm::Sha256.hmac(&key, &[&data]);
        assert_eq!(mac.as_bytes(), expected.as_slice(), "vector {number}");
        let (head, tail) = data.split_at(data.len() / 2);
        assert_eq!(
            HashAlgorithm::Sha256.hmac(&key, &[head, tail]),
            mac,
            "split input, vector {number}"
        );
        let mut other_key = key.clone();
        other_key[0] ^= 1;
        assert_ne!(HashAlgorithm::Sha256.hmac(&other_key, &[&data]), mac);
    }
}

#[test]
fn ecdsa_p256_sha256_vectors() {
    let vectors = blocks(ECDSA_P256_SHA256);
    assert_eq!(vectors.len(), 9, "every vector in the file was read");
    let mut outcomes = (0, 0);
    for (number, block) in vectors.iter().enumerate() {
        let public = SigningPublicKey::from_sec1(&hex_field(block, "pub")).unwrap();
        let message = hex_field(block, "msg");
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&hex_field(block, "r"));
        signature[32..].copy_from_slice(&hex_field(block, "s"));
        let signature = Signature::from_bytes(signature);
        let valid = match field(block, "valid") {
            "true" => true,
            "false" => false,
            other => panic!("valid = {other}"),
        };
        let result = public.verify(&message, &signature);
        if valid {
            assert_eq!(result, Ok(()), "vector {number} should verify");
            let altered = [message.as_slice(), b"!"].concat();
            assert_eq!(
                public.verify(&altered, &signature),
                Err(CryptoError::BadSignature),
                "vector {number} with another message"
            );
            outcomes.0 += 1;
        } else {
            assert_eq!(
                result,
                Err(CryptoError::BadSignature),
                "vector {number} should not verify"
            );
            outcomes.1 += 1;
        }
        // Where the private key is given, it is the public key's discrete log.
        if let Some(private) = block.get("priv") {
            let pair = EncryptionKeyPair::from_scalar(&hex::decode(private).unwrap()).unwrap();
            assert_eq!(pair.public().as_sec1(), public.as_sec1());
        }
    }
    assert_eq!(outcomes, (6, 3));
}

#[test]
fn ecdsa_accepts_high_s_signatures() {
    // Four valid vectors have s > n/2 (RFC 6979 "sample", Wycheproof tcIds 115,
    // 117, 118). ECDSA verification, unlike Bitcoin's low-s policy, accepts them,
    // and so must we: TPMs and X.509 signers produce either form.
    // `ecdsa_p256_sha256_vectors` checks that they verify.
    let vectors = blocks(ECDSA_P256_SHA256);
    let half_order =
        hex::decode("7fffffff800000007fffffffffffffffde737d56d38bcf4279dce5617e3192a8").unwrap();
    let high_s = vectors
        .iter()
        .filter(|block| field(block, "valid") == "true")
        .filter(|block| hex_field(block, "s") > half_order)
        .count();
    assert_eq!(high_s, 4, "the file has four valid high-s signatures");
}

#[test]
fn ecdsa_rejects_keys_off_the_curve() {
    let vectors = blocks(ECDSA_P256_SHA256);
    let mut point = hex_field(&vectors[0], "pub");
    point[64] ^= 0x01;
    assert_eq!(
        SigningPublicKey::from_sec1(&point),
        Err(CryptoError::InvalidPublicKey)
    );
    let mut compressed_tag = hex_field(&vectors[0], "pub");
    compressed_tag[0] = 0x02;
    assert_eq!(
        SigningPublicKey::from_sec1(&compressed_tag),
        Err(CryptoError::InvalidPublicKey)
    );
}
