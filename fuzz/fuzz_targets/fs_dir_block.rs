//! Fuzzes the directory block decoder (`Directory::from_blocks`): a directory's
//! sector plaintext comes from the store (after verification, but a writer with a
//! writecap can put anything there). Arbitrary bytes give an error, never a
//! panic; what decodes re-encodes to a block that decodes to the same entries.
#![no_main]

use blocktree_fs::dir::Directory;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Blocks are whole 4 KiB sectors: other lengths are refused, and the fuzzer's
    // input becomes the start of a block so it explores the content.
    if data.len() != 4096 {
        assert!(Directory::from_blocks(&[data.to_vec()]).is_err());
    }
    let mut block = data.to_vec();
    block.resize(4096, 0);
    let Ok(mut dir) = Directory::from_blocks(&[block]) else {
        return;
    };
    let names: Vec<(u64, Vec<u8>)> = dir
        .entries_from(0)
        .map(|(cookie, name, _)| (cookie, name.to_vec()))
        .collect();
    // Touch every entry so take_dirty re-encodes the block.
    for (_, name) in &names {
        let entry = dir.get(name).expect("decoded entry is present");
        assert!(dir.replace(name, entry));
    }
    let (blocks, count) = dir.take_dirty();
    let mut plaintexts = vec![vec![0u8; 4096]; count as usize];
    for (index, bytes) in blocks {
        plaintexts[index as usize] = bytes;
    }
    let again = Directory::from_blocks(&plaintexts).expect("re-encoded block decodes");
    let renamed: Vec<(u64, Vec<u8>)> = again
        .entries_from(0)
        .map(|(cookie, name, _)| (cookie, name.to_vec()))
        .collect();
    assert_eq!(names, renamed);
});
