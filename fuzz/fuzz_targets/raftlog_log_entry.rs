//! Fuzzes the Raft log's on-disk decoders (`blocktree_raftlog::logstore` and
//! `codec`): an entry's first part (part count, then bytes), the entry
//! encoding, the vote, log ids and the state machine's applied state, all read
//! from the engine at every open. Arbitrary bytes give an error, never a panic,
//! and what decodes encodes to bytes that decode to the same encoding.
#![no_main]

use blocktree_raftlog::codec::{self, RaftKind};
use blocktree_raftlog::logstore::{decode_entry, parse_first_part};
use blocktree_raftlog::statemachine::AppliedState;
use blocktree_raftlog::types::{LogId, Vote};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(kind: RaftKind, data: &[u8]) {
    if let Ok(value) = codec::decode::<T>(kind, data) {
        let bytes = codec::encode(kind, &value);
        let again: T = codec::decode(kind, &bytes).expect("an encoding decodes");
        assert_eq!(codec::encode(kind, &again), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((_count, rest)) = parse_first_part(data) {
        if let Ok(entry) = decode_entry(rest) {
            let bytes = codec::encode(RaftKind::LogEntry, &entry);
            let again = decode_entry(&bytes).expect("an encoded entry decodes");
            assert_eq!(codec::encode(RaftKind::LogEntry, &again), bytes);
        }
    }
    let _ = decode_entry(data);
    round_trip::<Vote>(RaftKind::Vote, data);
    round_trip::<Option<LogId>>(RaftKind::LogId, data);
    round_trip::<LogId>(RaftKind::LogId, data);
    round_trip::<AppliedState>(RaftKind::AppliedState, data);
});
