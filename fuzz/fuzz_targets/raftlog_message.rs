//! Fuzzes the Raft service's messages as bttp hands them over (postcard):
//! `RaftMessage` (append-entries, votes, snapshot transfers, join, leave,
//! status, sector fetches, forwarded writes, inode reservations, read
//! indexes, address updates) and `RaftReply`, and the forwarded `SectorBatch`
//! a `ForwardWrite` carries (`forward::decode_batch`, tried on the whole
//! input and on the batch inside a decoded message). Arbitrary bytes give an
//! error, never a panic, and what decodes encodes to bytes that decode again
//! to the same encoding.
#![no_main]

use blocktree_raftlog::forward::{decode_batch, encode_batch};
use blocktree_raftlog::network::{RaftMessage, RaftReply};
use libfuzzer_sys::fuzz_target;

fn batch_round_trip(data: &[u8]) {
    if let Ok(batch) = decode_batch(data) {
        let bytes = encode_batch(&batch);
        let again = decode_batch(&bytes).expect("an encoded batch decodes");
        assert_eq!(encode_batch(&again), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    batch_round_trip(data);
    if let Ok(message) = postcard::from_bytes::<RaftMessage>(data) {
        if let RaftMessage::ForwardWrite { batch } = &message {
            batch_round_trip(batch);
        }
        let bytes = postcard::to_allocvec(&message).expect("a message encodes");
        let again: RaftMessage = postcard::from_bytes(&bytes).expect("an encoding decodes");
        assert_eq!(postcard::to_allocvec(&again).expect("encodes"), bytes);
    }
    if let Ok(reply) = postcard::from_bytes::<RaftReply>(data) {
        let bytes = postcard::to_allocvec(&reply).expect("a reply encodes");
        let again: RaftReply = postcard::from_bytes(&bytes).expect("an encoding decodes");
        assert_eq!(postcard::to_allocvec(&again).expect("encodes"), bytes);
    }
});
