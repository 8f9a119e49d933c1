//! The seed inputs of the `engine_record` fuzz target (`fuzz/seeds/engine_record/`)
//! are small valid chunks and records built with `ChunkBuilder`, and they still
//! parse as such with the current format. `BT_WRITE_FUZZ_SEEDS=1 cargo test -p
//! blocktree-engine --test record_seeds` (re)writes them after a format change.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;

use blocktree_engine::record::{
    BLOCK, CHUNK_HEADER_LEN, ChunkBuilder, RecordHeader, RecordKind, align_up, parse_chunk,
    parse_record,
};

/// Seeds stay small: they are committed, and the fuzzer starts from them.
const MAX_SEED: usize = 8 << 10;

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/engine_record")
}

fn header(
    key: u8,
    kind: RecordKind,
    payload: &[u8],
    batch: u64,
    part_len: u32,
    shards: u32,
) -> RecordHeader {
    RecordHeader {
        key: [key; 16],
        payload_len: payload.len() as u32,
        kind,
        batch,
        part_len,
        shards,
    }
}

/// A chunk of `records`; `padded` keeps the zero padding to a whole block.
fn chunk(sequence: u64, synced: u64, records: &[(RecordHeader, Vec<u8>)], padded: bool) -> Vec<u8> {
    let body: usize = records.iter().map(|(header, _)| header.footprint()).sum();
    let mut buffer = vec![0u8; align_up(CHUNK_HEADER_LEN + body, BLOCK)];
    let mut builder = ChunkBuilder::new(&mut buffer);
    for (header, payload) in records {
        builder.push(header, payload).unwrap();
    }
    builder.finish(sequence, synced, 0);
    if !padded {
        buffer.truncate(CHUNK_HEADER_LEN + body);
    }
    buffer
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hello = b"hello, sector".to_vec();
    let pattern: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let put = |key, payload: &Vec<u8>, batch, part_len, shards| {
        (
            header(key, RecordKind::Put, payload, batch, part_len, shards),
            payload.clone(),
        )
    };
    let delete = |key, batch, part_len, shards| {
        (
            header(key, RecordKind::Delete, &[], batch, part_len, shards),
            Vec::new(),
        )
    };
    let one = chunk(7, 6, &[put(1, &hello, 3, 1, 0b1)], false);
    let mut bad_payload = one.clone();
    bad_payload[CHUNK_HEADER_LEN + 48 + 2] ^= 1;
    let record = {
        let (header, payload) = put(9, &vec![0xab; 100], 42, 2, 0b101);
        let mut chunk = chunk(1, 0, &[(header, payload)], false);
        chunk.split_off(CHUNK_HEADER_LEN)
    };
    vec![
        ("empty-chunk", chunk(1, 0, &[], false)),
        ("one-put", one),
        ("payload-checksum-bad", bad_payload),
        (
            "put-delete-put",
            chunk(
                12,
                11,
                &[
                    put(1, &hello, 5, 3, 0b11),
                    delete(2, 5, 3, 0b11),
                    put(3, &vec![0; 17], 5, 3, 0b11),
                ],
                false,
            ),
        ),
        (
            "padded-block",
            chunk(
                2,
                1,
                &[put(4, &hello, 8, 2, 0b1), delete(5, 8, 2, 0b1)],
                true,
            ),
        ),
        (
            "large-payload",
            chunk(30, 29, &[put(6, &pattern, 9, 1, 0b1000)], false),
        ),
        ("bare-record", record),
    ]
}

#[test]
fn fuzz_seeds_are_valid() {
    let dir = seed_dir();
    if std::env::var_os("BT_WRITE_FUZZ_SEEDS").is_some() {
        fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds() {
            fs::write(dir.join(name), bytes).unwrap();
        }
    }
    // The generated seeds parse (all but one record intact) ...
    for (name, bytes) in seeds() {
        assert!(bytes.len() < MAX_SEED, "{name} is {} bytes", bytes.len());
        if name == "bare-record" {
            assert!(parse_record(&bytes).unwrap().payload_intact);
            continue;
        }
        let (_, entries) = parse_chunk(&bytes).unwrap();
        for (_, entry) in entries {
            assert_eq!(
                entry.unwrap().payload_intact,
                name != "payload-checksum-bad",
                "{name}"
            );
        }
    }
    // ... and so do the committed ones, whatever they are.
    let Ok(committed) = fs::read_dir(&dir) else {
        panic!(
            "no seeds in {}: run with BT_WRITE_FUZZ_SEEDS=1",
            dir.display()
        );
    };
    for file in committed {
        let path = file.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        assert!(bytes.len() < MAX_SEED, "{} is too big", path.display());
        let parses = parse_chunk(&bytes).is_ok() || parse_record(&bytes).is_ok();
        assert!(
            parses,
            "{} no longer parses: regenerate the seeds",
            path.display()
        );
    }
}
