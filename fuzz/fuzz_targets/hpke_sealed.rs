//! Fuzzes the postcard decoding of an `HpkeSealed` (readcaps and exported roots
//! carry them) and `hpke::open` to a fixed receiver: invalid ephemeral keys,
//! short or forged ciphertexts and either AEAD give errors, never panics; a
//! ciphertext that opens (only the seeds) re-encodes to an equal one.
#![no_main]

use blocktree_core::hpke;
use blocktree_core::keys::{CryptoError, EncryptionPublicKey};
use blocktree_fuzz::{HPKE_INFO, HpkeInput, hpke_receiver, show};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = postcard::from_bytes::<HpkeInput>(data);
    show(&decoded);
    let Ok(input) = decoded else {
        return;
    };
    let _ = format!("{input:?}");
    let receiver = hpke_receiver();
    let opened = hpke::open::<CryptoError>(
        receiver.public(),
        |enc: &EncryptionPublicKey| receiver.diffie_hellman(enc),
        &input.sealed,
        HPKE_INFO,
        &input.aad,
    );
    show(&opened);
    if opened.is_ok() {
        let bytes = postcard::to_allocvec(&input.sealed).expect("serializing a ciphertext");
        assert_eq!(
            postcard::from_bytes::<hpke::HpkeSealed>(&bytes)
                .ok()
                .as_ref(),
            Some(&input.sealed)
        );
        // Bound to its info.
        assert!(
            hpke::open::<CryptoError>(
                receiver.public(),
                |enc: &EncryptionPublicKey| receiver.diffie_hellman(enc),
                &input.sealed,
                b"another purpose",
                &input.aad,
            )
            .is_err()
        );
    }
});
