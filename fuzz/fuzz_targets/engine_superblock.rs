//! Fuzzes the sector engine's superblock decoder (`Superblock::decode`), which
//! reads a file from disk: arbitrary bytes give an error, never a panic, and what
//! decodes encodes back to the same bytes.
#![no_main]

use blocktree_engine::superblock::Superblock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(superblock) = Superblock::decode(data) {
        assert_eq!(superblock.encode().as_slice(), data);
    }
});
