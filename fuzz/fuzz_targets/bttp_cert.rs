//! Fuzzes the parsing of a peer's bttp certificate (`cert::parse_certificate`,
//! X.509 DER with a writecap extension) and the checks the verifiers run on it
//! (`verify::check_certificate`, `verify::check_client_certificate`): whatever
//! a peer presents in a handshake, parsing and checking return a result, never
//! a panic, and a certificate that passes a check parses.
#![no_main]

use blocktree_core::writecap::RevocationList;
use blocktree_fuzz::{NOW, fixed_path, show};
use blocktree_netstack::cert::parse_certificate;
use blocktree_netstack::verify::{check_certificate, check_client_certificate};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_certificate(data);
    show(&parsed);
    let none = RevocationList::new();
    let Ok(peer) = parsed else {
        assert!(check_certificate(data, 0, &fixed_path(), NOW, &none).is_err());
        return;
    };
    let _ = format!("{peer:?}");
    let path = peer.writecap.path().cloned().unwrap_or_else(fixed_path);
    let checked = check_certificate(data, 0, &path, NOW, &none);
    show(&checked);
    if let Ok(checked) = &checked {
        assert_eq!(checked, &peer);
        let mut revoked = RevocationList::new();
        revoked.revoke(peer.key.principal());
        assert!(check_certificate(data, 0, &path, NOW, &revoked).is_err());
    }
    assert!(check_certificate(data, 1, &path, NOW, &none).is_err());
    let trusted = BTreeSet::from([path.root()]);
    let client = check_client_certificate(data, 0, &trusted, NOW, &none);
    show(&client);
    assert_eq!(client.is_ok(), checked.is_ok());
});
