//! Fuzzes the sector service's generation file parser (`GenerationInfo::decode`),
//! read from disk at every open: arbitrary text gives an error, never a panic, and
//! what parses encodes and parses back to the same value.
#![no_main]

use blocktree_raftlog::GenerationInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = GenerationInfo::decode(text) {
        assert_eq!(GenerationInfo::decode(&info.encode()), Ok(info));
    }
});
