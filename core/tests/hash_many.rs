//! `HashAlgorithm::hash_many` gives exactly what `hash` gives for each message, for
//! every length around SHA-256's block and padding boundaries, any split into parts,
//! and batches whose messages end at different blocks.

use blocktree_core::hash::HashAlgorithm;
use proptest::prelude::*;

/// Deterministic bytes, different per `seed`.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn check(algorithm: HashAlgorithm, messages: &[Vec<Vec<u8>>]) {
    let parts: Vec<Vec<&[u8]>> = messages
        .iter()
        .map(|message| message.iter().map(Vec::as_slice).collect())
        .collect();
    let views: Vec<&[&[u8]]> = parts.iter().map(Vec::as_slice).collect();
    let together = algorithm.hash_many(&views);
    assert_eq!(together.len(), messages.len());
    for (index, (parts, digest)) in views.iter().zip(&together).enumerate() {
        assert_eq!(
            digest.as_bytes(),
            algorithm.hash(parts).as_bytes(),
            "message {index} of {} ({} bytes in {} parts)",
            views.len(),
            parts.iter().map(|part| part.len()).sum::<usize>(),
            parts.len()
        );
    }
}

#[test]
fn every_length_near_the_block_boundaries_alone_and_in_lanes() {
    for algorithm in [HashAlgorithm::Sha256, HashAlgorithm::Sha512] {
        for len in 0..=200 {
            // The same length in one part, behind a one-byte tag (a Merkle leaf), and
            // beside messages one and two blocks longer.
            let message = bytes(len as u64, len);
            let tagged = vec![vec![0u8], message.clone()];
            let longer = vec![bytes(1000 + len as u64, len + 64)];
            let longest = vec![bytes(2000 + len as u64, len + 130), Vec::new()];
            check(algorithm, &[vec![message.clone()]]);
            check(algorithm, &[vec![message.clone()], tagged.clone()]);
            check(
                algorithm,
                &[
                    tagged,
                    vec![message.clone()],
                    longer.clone(),
                    longest.clone(),
                ],
            );
            check(
                algorithm,
                &[
                    longest,
                    longer,
                    vec![message.clone()],
                    vec![message.clone()],
                    vec![],
                ],
            );
        }
    }
}

#[test]
fn sector_sized_records_in_batches_of_every_size() {
    let records: Vec<Vec<u8>> = (0..11).map(|seed| bytes(seed, 65_536 + 28)).collect();
    for count in 0..=records.len() {
        let messages: Vec<Vec<Vec<u8>>> = records[..count]
            .iter()
            .map(|record| vec![vec![0u8], record.clone()])
            .collect();
        check(HashAlgorithm::Sha256, &messages);
    }
}

#[test]
fn known_answers() {
    // FIPS 180-2 appendix B.1 and B.2, computed in one batch.
    let digests = HashAlgorithm::Sha256.hash_many(&[
        &[b"abc"],
        &[
            b"abcdbcdecdefdefgefghfghighij",
            b"hijkijkljklmklmnlmnomnopnopq",
        ],
    ]);
    let hex: Vec<String> = digests
        .iter()
        .map(|digest| {
            digest
                .as_bytes()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect()
        })
        .collect();
    assert_eq!(
        hex,
        [
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        ]
    );
}

proptest! {
    #[test]
    fn any_batch_matches_one_message_at_a_time(
        messages in prop::collection::vec(
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..4),
            0..10,
        )
    ) {
        check(HashAlgorithm::Sha256, &messages);
    }
}
