//! Fuzzes `decode::<WritecapRequest>` (a runtime's request, handed to an
//! operator as a file) and `WritecapRequest::verify`: no panics, a request that
//! verifies names its signing key's principal, and the request re-encodes to an
//! equal one.
#![no_main]

use blocktree_core::encoding;
use blocktree_core::provision::WritecapRequest;
use blocktree_fuzz::{assert_round_trip, show};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = encoding::decode::<WritecapRequest>(data);
    show(&decoded);
    let Ok(request) = decoded else {
        return;
    };
    assert_round_trip(&request);
    let _ = format!("{request:?}");
    if let Some(path) = &request.path {
        let _ = path.to_string();
    }
    let verdict = request.verify();
    show(&verdict);
    assert_eq!(request.principal(), request.signing_key.principal());
    if verdict.is_ok() {
        // The signature covers the path: a request for another path must fail.
        let mut moved = request.clone();
        moved.path = match &request.path {
            Some(path) => path.parent(),
            None => Some(blocktree_fuzz::fixed_path()),
        };
        if moved.path != request.path {
            assert!(moved.verify().is_err());
        }
    }
});
