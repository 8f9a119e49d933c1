//! Fuzzes `decode::<ExportedRoot>` (root credentials moved between stores as a
//! file) and `KdfParams::check`, which must bound the Argon2id cost before any
//! key is derived (derive itself is not called: it is expensive by design). A
//! decoded export re-encodes to an equal one.
#![no_main]

use blocktree_core::credstore::{ExportedRoot, KdfParams};
use blocktree_core::encoding;
use blocktree_fuzz::{assert_round_trip, show};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = encoding::decode::<ExportedRoot>(data);
    show(&decoded);
    let Ok(exported) = decoded else {
        return;
    };
    assert_round_trip(&exported);
    let _ = format!("{exported:?}");
    let _ = exported.public.principal().to_string();
    let kdf = exported.kdf;
    let checked = kdf.check();
    show(&checked);
    let cost = u64::from(kdf.memory_kib) * u64::from(kdf.iterations);
    if checked.is_ok() {
        assert!(kdf.parallelism >= 1 && kdf.parallelism <= KdfParams::MAX_PARALLELISM);
        assert!(kdf.iterations >= 1 && kdf.iterations <= KdfParams::MAX_ITERATIONS);
        assert!(kdf.memory_kib >= 8 * kdf.parallelism);
        assert!(
            cost <= u64::from(KdfParams::MAX_MEMORY_KIB) * u64::from(KdfParams::MAX_ITERATIONS)
        );
    }
});
