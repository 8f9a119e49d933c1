//! Helpers shared by the integration tests: keys, paths, times, writecaps.
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used)]

use blocktree_core::BtPath;
use blocktree_core::credstore::KdfParams;
use blocktree_core::keys::{Signer, SigningKeyPair};
use blocktree_core::principal::PrincipalId;
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{Certificate, RevocationList, Writecap};

/// The fixed "current time" of tests that pass the clock explicitly.
pub const NOW: Timestamp = Timestamp(1_700_000_000);

/// `NOW` moved forward by `seconds`.
pub fn now_plus(seconds: u64) -> Timestamp {
    Timestamp(NOW.0 + seconds)
}

/// A fresh ECDSA P-256 key pair.
pub fn signing_key() -> SigningKeyPair {
    SigningKeyPair::generate().unwrap()
}

/// The principal of a key pair.
pub fn principal_of(key: &SigningKeyPair) -> PrincipalId {
    Signer::principal(key)
}

/// `/<root>/<components…>`.
pub fn path_under(root: PrincipalId, components: &[&str]) -> BtPath {
    components
        .iter()
        .fold(BtPath::root_of(root), |path, component| {
            path.join(component).unwrap()
        })
}

/// `/<root key's principal>/<components…>`.
pub fn path_of(root: &SigningKeyPair, components: &[&str]) -> BtPath {
    path_under(principal_of(root), components)
}

/// A certificate signed by `issuer`, granting `subject` authority over `path`.
pub fn certificate(
    issuer: &SigningKeyPair,
    subject: &SigningKeyPair,
    path: BtPath,
    expires: Timestamp,
) -> Certificate {
    Certificate::sign(issuer, principal_of(subject), path, expires).unwrap()
}

/// A one-certificate writecap signed by the root of `path`.
pub fn root_grant(
    root: &SigningKeyPair,
    subject: &SigningKeyPair,
    path: BtPath,
    expires: Timestamp,
) -> Writecap {
    Writecap::issue(root, None, principal_of(subject), path, expires, NOW).unwrap()
}

/// No revoked principals.
pub fn nobody_revoked() -> RevocationList {
    RevocationList::new()
}

/// Argon2id parameters cheap enough for tests.
pub fn fast_kdf() -> KdfParams {
    KdfParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    }
}

/// True when `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}
