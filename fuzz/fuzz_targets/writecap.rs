//! Fuzzes `decode::<Writecap>` (writecaps from credential stores, metadata and
//! the wire) and `Writecap::validate`: decoding never panics, a decoded writecap
//! re-encodes to an equal one, validation against its own path at a fixed clock
//! returns a result, and a writecap that validates stops validating once its
//! subject is revoked or its earliest expiry is reached.
#![no_main]

use blocktree_core::encoding;
use blocktree_core::writecap::{RevocationList, Writecap, WritecapError};
use blocktree_fuzz::{NOW, assert_round_trip, fixed_path, show};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = encoding::decode::<Writecap>(data);
    show(&decoded);
    let Ok(writecap) = decoded else {
        return;
    };
    assert_round_trip(&writecap);
    let _ = format!("{writecap:?}");
    // What `blocktree writecap show` prints about a writecap read from a file.
    for cert in writecap.chain() {
        let _ = format!("{} {} {}", cert.path, cert.issued_to, cert.expires);
    }

    let none = RevocationList::new();
    let (Some(target), Some(subject), Some(expires)) = (
        writecap.path().cloned(),
        writecap.subject(),
        writecap.expires(),
    ) else {
        assert_eq!(
            writecap.validate(&fixed_path(), NOW, &none),
            Err(WritecapError::Empty)
        );
        return;
    };
    let verdict = writecap.validate(&target, NOW, &none);
    show(&verdict);
    assert_eq!(
        writecap.validate_for(&subject, &target, NOW, &none),
        verdict
    );
    if let Ok(child) = target.join("fuzz") {
        show(&writecap.validate(&child, NOW, &none));
    }
    if let Some(parent) = target.parent() {
        show(&writecap.validate(&parent, NOW, &none));
    }
    if verdict.is_ok() {
        let mut revoked = RevocationList::new();
        revoked.revoke(subject);
        assert!(writecap.validate(&target, NOW, &revoked).is_err());
        assert!(writecap.validate(&target, expires, &none).is_err());
    }
});
