//! Fuzzes what a snapshot chunk and a log entry's request carry (postcard):
//! the sector records of a `SnapshotChunk` and the staged batch of a write.
//! Arbitrary bytes give an error, never a panic, and what decodes round-trips.
#![no_main]

use blocktree_raftlog::network::SnapshotRecord;
use blocktree_raftlog::store::StagedBatch;
use blocktree_raftlog::types::RaftRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = postcard::from_bytes::<Vec<SnapshotRecord>>(data) {
        let bytes = postcard::to_allocvec(&records).expect("records encode");
        assert_eq!(
            postcard::from_bytes::<Vec<SnapshotRecord>>(&bytes).ok(),
            Some(records)
        );
    }
    if let Ok(batch) = postcard::from_bytes::<StagedBatch>(data) {
        let bytes = postcard::to_allocvec(&batch).expect("a batch encodes");
        assert_eq!(
            postcard::from_bytes::<StagedBatch>(&bytes).ok(),
            Some(batch)
        );
    }
    if let Ok(request) = postcard::from_bytes::<RaftRequest>(data) {
        let bytes = postcard::to_allocvec(&request).expect("a request encodes");
        assert_eq!(
            postcard::from_bytes::<RaftRequest>(&bytes).ok(),
            Some(request)
        );
    }
});
