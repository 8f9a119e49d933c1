//! Fuzzes the sector engine's log decoders, which read segment files from disk:
//! `ChunkHeader::parse`, `parse_chunk` and `parse_record` (at the start of the
//! input and right after a chunk header). Arbitrary bytes give an error, never a
//! panic; what parses is consistent (offsets inside the chunk, payload lengths as
//! declared), and re-encoding the records that parse with `ChunkBuilder` gives a
//! chunk that parses back to the same header fields, record headers and payloads.
#![no_main]

use blocktree_engine::record::{
    BLOCK, CHUNK_HEADER_LEN, ChunkBuilder, ChunkHeader, ParsedRecord, RECORD_ALIGN, RecordHeader,
    align_up, parse_chunk, parse_record, record_footprint,
};
use blocktree_fuzz::show;
use libfuzzer_sys::fuzz_target;

/// Builds a chunk of `records` and checks it parses back to them.
fn rebuild(sequence: u64, synced_through: u64, log_id: u64, records: &[(RecordHeader, &[u8])]) {
    let body: usize = records.iter().map(|(header, _)| header.footprint()).sum();
    let mut buffer = vec![0u8; align_up(CHUNK_HEADER_LEN + body, BLOCK)];
    let mut builder = ChunkBuilder::new(&mut buffer);
    let mut offsets = Vec::with_capacity(records.len());
    for (header, payload) in records {
        match builder.push(header, payload) {
            Some(offset) => offsets.push(offset),
            None => panic!("a chunk sized for its records refused one"),
        }
    }
    let len = builder.finish(sequence, synced_through, log_id);
    assert_eq!(len, buffer.len());
    let parsed = ChunkHeader::parse(&buffer);
    let Ok(header) = parsed else {
        panic!("a built chunk header does not parse: {parsed:?}");
    };
    assert_eq!(
        (header.sequence, header.synced_through, header.record_count),
        (sequence, synced_through, records.len() as u32)
    );
    assert_eq!(header.body_len as usize, body);
    assert_eq!(header.disk_len(), len);
    let Ok((again, entries)) = parse_chunk(&buffer) else {
        panic!("a built chunk does not parse");
    };
    assert_eq!(again, header);
    assert_eq!(entries.len(), records.len());
    for ((offset, entry), ((header, payload), built_at)) in
        entries.iter().zip(records.iter().zip(&offsets))
    {
        assert_eq!(offset, built_at);
        let Ok(record) = entry else {
            panic!("a built record does not parse: {entry:?}");
        };
        assert_eq!(record.header, *header);
        assert_eq!(record.payload, *payload);
        // Re-encoding computes a fresh payload checksum: the payload is intact now.
        assert!(record.payload_intact);
    }
}

fn check_record(record: &ParsedRecord<'_>) {
    assert_eq!(record.payload.len(), record.header.payload_len as usize);
    assert_eq!(
        record.header.footprint(),
        record_footprint(record.payload.len())
    );
}

fuzz_target!(|data: &[u8]| {
    let header = ChunkHeader::parse(data);
    show(&header);
    if let Ok(header) = &header {
        assert!(header.disk_len() >= CHUNK_HEADER_LEN + header.body_len as usize);
        assert_eq!(header.disk_len() % BLOCK, 0);
    }

    let chunk = parse_chunk(data);
    show(&chunk);
    if let Ok((chunk, entries)) = &chunk {
        assert_eq!(Ok(*chunk), header);
        let end = CHUNK_HEADER_LEN + chunk.body_len as usize;
        assert!(entries.len() <= chunk.record_count as usize);
        let mut good = Vec::new();
        let mut previous = None;
        for (offset, entry) in entries {
            assert!(*offset >= CHUNK_HEADER_LEN && *offset <= end);
            assert_eq!(offset % RECORD_ALIGN, 0);
            assert!(previous.is_none_or(|previous| previous < *offset));
            previous = Some(*offset);
            show(entry);
            if let Ok(record) = entry {
                check_record(record);
                assert!(offset + record.header.footprint() <= end);
                good.push((record.header, record.payload));
            }
        }
        rebuild(chunk.sequence, chunk.synced_through, chunk.log_id, &good);
    }

    for start in [0, CHUNK_HEADER_LEN] {
        let Some(bytes) = data.get(start..) else {
            continue;
        };
        let record = parse_record(bytes);
        show(&record);
        if let Ok(record) = record {
            check_record(&record);
            rebuild(1, 0, 0, &[(record.header, record.payload)]);
        }
    }
});
