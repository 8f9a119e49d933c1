//! Fuzzes the Raft service's messages as bttp hands them over (postcard):
//! `RaftMessage` (append-entries, votes, snapshot transfers, join, leave,
//! status, sector fetches) and `RaftReply`. Arbitrary bytes give an error,
//! never a panic, and what decodes encodes to bytes that decode again to the
//! same encoding.
#![no_main]

use blocktree_raftlog::network::{RaftMessage, RaftReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = postcard::from_bytes::<RaftMessage>(data) {
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
