//! Fuzzes `SectorOpener::open_to_vec`, the parser of sealed sector records read
//! from disk, with one fixed epoch key and sector id: arbitrary bytes give an
//! error, never a panic; a record that opens (only the seeds, sealed with the same
//! key) yields exactly its plaintext length, and fails as any other sector.
#![no_main]

use blocktree_core::sector::{RECORD_OVERHEAD, SealError, SectorId, SectorKind, SectorOpener};
use blocktree_fuzz::{SECTOR, sector_opener, show};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opener = sector_opener();
    let opened = opener.open_to_vec(&SECTOR, data);
    show(&opened);
    match opened {
        Ok(plaintext) => {
            assert_eq!(plaintext.len() + RECORD_OVERHEAD, data.len());
            let elsewhere = SectorId {
                sector: SectorKind::Merkle(0),
                ..SECTOR
            };
            assert_eq!(
                opener.open_to_vec(&elsewhere, data),
                Err(SealError::Tampered(elsewhere))
            );
        }
        Err(SealError::Truncated(len)) => assert!(len < RECORD_OVERHEAD),
        Err(_) => {}
    }
    // The in-place form rejects a wrongly sized buffer instead of writing past it.
    if let Ok(len) = SectorOpener::plaintext_len(data.len()) {
        let mut short = vec![0u8; len.saturating_sub(1)];
        let result = opener.open(&SECTOR, data, &mut short);
        assert!(len == 0 || matches!(result, Err(SealError::BufferSize { .. })));
    }
});
