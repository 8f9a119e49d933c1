//! Writecap chains: valid chains validate, and each rule of `Writecap::validate`
//! and `Writecap::issue`, broken alone, fails with its own error.
#![allow(clippy::unwrap_used)]

mod common;

use blocktree_core::BtPath;
use blocktree_core::encoding::{self, DecodeError, FORMAT_VERSION, Kind};
use blocktree_core::keys::{Signature, SigningKeyPair};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{
    Certificate, MAX_CHAIN_LEN, RevocationList, Writecap, WritecapError,
};
use common::{
    NOW, certificate, nobody_revoked, now_plus, path_of, principal_of, root_grant, signing_key,
};

const DAY: u64 = 86_400;

/// A domain: the root, an admin over `/R/a`, a sub-admin over `/R/a/b` and a
/// writer, plus an outsider with no authority.
struct Domain {
    root: SigningKeyPair,
    admin: SigningKeyPair,
    sub: SigningKeyPair,
    writer: SigningKeyPair,
    outsider: SigningKeyPair,
}

impl Domain {
    fn new() -> Domain {
        Domain {
            root: signing_key(),
            admin: signing_key(),
            sub: signing_key(),
            writer: signing_key(),
            outsider: signing_key(),
        }
    }

    fn path(&self, components: &[&str]) -> BtPath {
        path_of(&self.root, components)
    }

    /// root → writer over /R/a/b.
    fn one_cert(&self) -> Writecap {
        Writecap::from_chain(vec![certificate(
            &self.root,
            &self.writer,
            self.path(&["a", "b"]),
            now_plus(DAY),
        )])
    }

    /// root → admin over /R/a; admin → writer over /R/a/b.
    fn two_certs(&self) -> Writecap {
        Writecap::from_chain(vec![
            certificate(
                &self.admin,
                &self.writer,
                self.path(&["a", "b"]),
                now_plus(DAY),
            ),
            certificate(
                &self.root,
                &self.admin,
                self.path(&["a"]),
                now_plus(2 * DAY),
            ),
        ])
    }

    /// root → admin over /R/a; admin → sub over /R/a/b; sub → writer over /R/a/b/c.
    fn three_certs(&self) -> Writecap {
        Writecap::from_chain(vec![
            certificate(
                &self.sub,
                &self.writer,
                self.path(&["a", "b", "c"]),
                now_plus(DAY),
            ),
            certificate(
                &self.admin,
                &self.sub,
                self.path(&["a", "b"]),
                now_plus(2 * DAY),
            ),
            certificate(
                &self.root,
                &self.admin,
                self.path(&["a"]),
                now_plus(3 * DAY),
            ),
        ])
    }

    /// A file inside all three chains' grants.
    fn target(&self) -> BtPath {
        self.path(&["a", "b", "c", "file"])
    }
}

fn validate(writecap: &Writecap, target: &BtPath) -> Result<(), WritecapError> {
    writecap.validate(target, NOW, &nobody_revoked())
}

fn with_chain(writecap: &Writecap, edit: impl FnOnce(&mut Vec<Certificate>)) -> Writecap {
    let mut chain = writecap.chain().to_vec();
    edit(&mut chain);
    Writecap::from_chain(chain)
}

fn flip_signature_byte(certificate: &mut Certificate, index: usize) {
    let mut bytes = *certificate.signature.as_bytes();
    bytes[index] ^= 0x01;
    certificate.signature = Signature::from_bytes(bytes);
}

// ---- valid chains ----------------------------------------------------------

#[test]
fn valid_chains_of_one_two_and_three_certificates_validate() {
    let domain = Domain::new();
    let target = domain.target();
    for writecap in [domain.one_cert(), domain.two_certs(), domain.three_certs()] {
        assert_eq!(validate(&writecap, &target), Ok(()));
        assert_eq!(
            writecap.validate_for(
                &principal_of(&domain.writer),
                &target,
                NOW,
                &nobody_revoked()
            ),
            Ok(())
        );
        assert_eq!(writecap.subject(), Some(principal_of(&domain.writer)));
        // The grant's own path is inside it, too.
        let own = writecap.path().unwrap().clone();
        assert_eq!(validate(&writecap, &own), Ok(()));
    }
    assert_eq!(domain.three_certs().expires(), Some(now_plus(DAY)));
}

#[test]
fn a_root_grant_over_the_whole_domain_validates() {
    let domain = Domain::new();
    let writecap = root_grant(&domain.root, &domain.admin, domain.path(&[]), now_plus(DAY));
    assert_eq!(validate(&writecap, &domain.path(&[])), Ok(()));
    assert_eq!(validate(&writecap, &domain.target()), Ok(()));
}

#[test]
fn a_chain_of_max_len_validates() {
    let deep = DeepChain::new(MAX_CHAIN_LEN);
    assert_eq!(deep.writecap.chain().len(), MAX_CHAIN_LEN);
    assert_eq!(validate(&deep.writecap, &deep.target), Ok(()));
}

/// A properly signed chain of `len` certificates, all over `/R/deep`.
struct DeepChain {
    /// The holders, first the one the writecap was issued to.
    holders: Vec<SigningKeyPair>,
    writecap: Writecap,
    target: BtPath,
}

impl DeepChain {
    fn new(len: usize) -> DeepChain {
        let root = signing_key();
        let path = path_of(&root, &["deep"]);
        let holders: Vec<SigningKeyPair> = (0..len).map(|_| signing_key()).collect();
        let chain = (0..len)
            .map(|index| {
                let issuer = holders.get(index + 1).unwrap_or(&root);
                certificate(issuer, &holders[index], path.clone(), now_plus(DAY))
            })
            .collect();
        DeepChain {
            holders,
            writecap: Writecap::from_chain(chain),
            target: path.join("file").unwrap(),
        }
    }
}

// ---- one test per rule of validate ------------------------------------------

#[test]
fn rule_chain_must_not_be_empty() {
    let domain = Domain::new();
    let empty = Writecap::from_chain(Vec::new());
    assert_eq!(
        validate(&empty, &domain.target()),
        Err(WritecapError::Empty)
    );
    assert_eq!(
        empty.validate_for(
            &principal_of(&domain.writer),
            &domain.target(),
            NOW,
            &nobody_revoked()
        ),
        Err(WritecapError::Empty)
    );
    assert_eq!(empty.subject(), None);
    assert_eq!(empty.expires(), None);
}

#[test]
fn rule_chain_must_not_exceed_max_len() {
    let deep = DeepChain::new(MAX_CHAIN_LEN + 1);
    assert_eq!(
        validate(&deep.writecap, &deep.target),
        Err(WritecapError::TooLong(MAX_CHAIN_LEN + 1))
    );
}

#[test]
fn rule_signatures_must_verify_flipped_signature_bytes() {
    let domain = Domain::new();
    let writecap = domain.three_certs();
    for index in 0..3 {
        for byte in [0, 31, 32, 63] {
            let forged = with_chain(&writecap, |chain| {
                flip_signature_byte(&mut chain[index], byte)
            });
            assert_eq!(
                validate(&forged, &domain.target()),
                Err(WritecapError::BadSignature { index }),
                "certificate {index}, signature byte {byte}"
            );
        }
    }
}

#[test]
fn rule_signatures_must_verify_fields_changed_after_signing() {
    let domain = Domain::new();
    let writecap = domain.two_certs();
    let target = domain.target();
    let tampered: Vec<(&str, usize, Writecap)> = vec![
        (
            "issued_to",
            0,
            with_chain(&writecap, |chain| {
                chain[0].issued_to = principal_of(&domain.outsider);
            }),
        ),
        (
            "path narrowed",
            0,
            with_chain(&writecap, |chain| {
                chain[0].path = domain.path(&["a", "b", "c"]);
            }),
        ),
        (
            "path widened",
            1,
            with_chain(&writecap, |chain| chain[1].path = domain.path(&[])),
        ),
        (
            "expiry extended",
            0,
            with_chain(&writecap, |chain| chain[0].expires = now_plus(365 * DAY)),
        ),
        (
            "expiry of the root's certificate",
            1,
            with_chain(&writecap, |chain| chain[1].expires = now_plus(3 * DAY)),
        ),
        (
            "issuer key swapped",
            0,
            with_chain(&writecap, |chain| {
                chain[0].issuer = *domain.outsider.public()
            }),
        ),
        (
            "signature moved from another certificate",
            0,
            with_chain(&writecap, |chain| chain[0].signature = chain[1].signature),
        ),
    ];
    for (what, index, writecap) in tampered {
        assert_eq!(
            validate(&writecap, &target),
            Err(WritecapError::BadSignature { index }),
            "{what}"
        );
    }
}

#[test]
fn rule_each_issuer_must_be_the_next_subject() {
    let domain = Domain::new();
    // The root granted /R/a to the outsider, not to the admin who signed below it.
    let writecap = Writecap::from_chain(vec![
        certificate(
            &domain.admin,
            &domain.writer,
            domain.path(&["a", "b"]),
            now_plus(DAY),
        ),
        certificate(
            &domain.root,
            &domain.outsider,
            domain.path(&["a"]),
            now_plus(DAY),
        ),
    ]);
    assert_eq!(
        validate(&writecap, &domain.target()),
        Err(WritecapError::BrokenChain {
            index: 0,
            issuer: principal_of(&domain.admin),
            next_subject: principal_of(&domain.outsider),
        })
    );
}

#[test]
fn rule_each_issuer_must_be_the_next_subject_in_the_middle() {
    let domain = Domain::new();
    let writecap = with_chain(&domain.three_certs(), |chain| {
        // The middle certificate is re-signed by the outsider instead of the admin.
        chain[1] = certificate(
            &domain.outsider,
            &domain.sub,
            domain.path(&["a", "b"]),
            now_plus(DAY),
        );
    });
    assert_eq!(
        validate(&writecap, &domain.target()),
        Err(WritecapError::BrokenChain {
            index: 1,
            issuer: principal_of(&domain.outsider),
            next_subject: principal_of(&domain.admin),
        })
    );
}

#[test]
fn rule_target_must_be_inside_the_first_certificate() {
    let domain = Domain::new();
    let writecap = domain.two_certs();
    let covered = domain.path(&["a", "b"]);
    let other_root = path_of(&domain.outsider, &["a", "b", "file"]);
    for target in [
        domain.path(&["a"]),
        domain.path(&["a", "x"]),
        domain.path(&["a", "bb"]),
        domain.path(&[]),
        other_root,
    ] {
        assert_eq!(
            validate(&writecap, &target),
            Err(WritecapError::PathNotCovered {
                target: target.clone(),
                covered: covered.clone(),
            })
        );
    }
}

#[test]
fn rule_paths_must_nest_a_delegate_cannot_widen_its_grant() {
    let domain = Domain::new();
    // The root granted the admin /R/a/b, but the admin signs /R/a for the writer.
    let writecap = Writecap::from_chain(vec![
        certificate(
            &domain.admin,
            &domain.writer,
            domain.path(&["a"]),
            now_plus(DAY),
        ),
        certificate(
            &domain.root,
            &domain.admin,
            domain.path(&["a", "b"]),
            now_plus(DAY),
        ),
    ]);
    assert_eq!(
        validate(&writecap, &domain.target()),
        Err(WritecapError::PathsNotNested {
            index: 0,
            path: domain.path(&["a"]),
            issuer_path: domain.path(&["a", "b"]),
        })
    );
}

#[test]
fn rule_paths_must_nest_a_middle_certificate_wider_than_the_one_above() {
    let domain = Domain::new();
    // root → admin over /R/a/b; admin → sub over /R/a (wider); sub → writer /R/a/b/c.
    let writecap = Writecap::from_chain(vec![
        certificate(
            &domain.sub,
            &domain.writer,
            domain.path(&["a", "b", "c"]),
            now_plus(DAY),
        ),
        certificate(
            &domain.admin,
            &domain.sub,
            domain.path(&["a"]),
            now_plus(DAY),
        ),
        certificate(
            &domain.root,
            &domain.admin,
            domain.path(&["a", "b"]),
            now_plus(DAY),
        ),
    ]);
    assert_eq!(
        validate(&writecap, &domain.target()),
        Err(WritecapError::PathsNotNested {
            index: 1,
            path: domain.path(&["a"]),
            issuer_path: domain.path(&["a", "b"]),
        })
    );
}

#[test]
fn rule_paths_must_nest_siblings_do_not() {
    let domain = Domain::new();
    let writecap = Writecap::from_chain(vec![
        certificate(
            &domain.admin,
            &domain.writer,
            domain.path(&["x"]),
            now_plus(DAY),
        ),
        certificate(
            &domain.root,
            &domain.admin,
            domain.path(&["a"]),
            now_plus(DAY),
        ),
    ]);
    assert_eq!(
        validate(&writecap, &domain.path(&["x", "file"])),
        Err(WritecapError::PathsNotNested {
            index: 0,
            path: domain.path(&["x"]),
            issuer_path: domain.path(&["a"]),
        })
    );
}

#[test]
fn rule_no_certificate_may_have_expired() {
    let domain = Domain::new();
    let target = domain.target();
    // Each position in turn is the only one that expires, at NOW + 100.
    for expiring in 0..3 {
        let expiry = |index: usize| {
            if index == expiring {
                now_plus(100)
            } else {
                now_plus(DAY)
            }
        };
        let writecap = Writecap::from_chain(vec![
            certificate(
                &domain.sub,
                &domain.writer,
                domain.path(&["a", "b", "c"]),
                expiry(0),
            ),
            certificate(
                &domain.admin,
                &domain.sub,
                domain.path(&["a", "b"]),
                expiry(1),
            ),
            certificate(&domain.root, &domain.admin, domain.path(&["a"]), expiry(2)),
        ]);
        let before = now_plus(99);
        assert_eq!(
            writecap.validate(&target, before, &nobody_revoked()),
            Ok(())
        );
        for at in [now_plus(100), now_plus(DAY - 1)] {
            assert_eq!(
                writecap.validate(&target, at, &nobody_revoked()),
                Err(WritecapError::Expired {
                    index: expiring,
                    expired: now_plus(100),
                }),
                "certificate {expiring} expired"
            );
        }
        assert_eq!(writecap.expires(), Some(now_plus(100)));
    }
}

#[test]
fn rule_last_certificate_must_be_signed_by_the_paths_root() {
    let domain = Domain::new();
    // An impostor root signs a grant over the real root's path.
    let impostor = &domain.outsider;
    let writecap = Writecap::from_chain(vec![
        certificate(
            &domain.admin,
            &domain.writer,
            domain.path(&["a", "b"]),
            now_plus(DAY),
        ),
        certificate(impostor, &domain.admin, domain.path(&["a"]), now_plus(DAY)),
    ]);
    assert_eq!(
        validate(&writecap, &domain.target()),
        Err(WritecapError::NotSignedByRoot {
            expected: principal_of(&domain.root),
            found: principal_of(impostor),
        })
    );
}

#[test]
fn rule_last_certificate_must_be_signed_by_the_paths_root_not_self_issued() {
    let domain = Domain::new();
    let writecap = Writecap::from_chain(vec![certificate(
        &domain.writer,
        &domain.writer,
        domain.path(&["a"]),
        now_plus(DAY),
    )]);
    assert_eq!(
        validate(&writecap, &domain.target()),
        Err(WritecapError::NotSignedByRoot {
            expected: principal_of(&domain.root),
            found: principal_of(&domain.writer),
        })
    );
}

#[test]
fn rule_a_chain_of_another_root_does_not_transfer() {
    let domain = Domain::new();
    let other = Domain::new();
    // A valid chain of the other domain, whose certificate paths are rewritten to
    // ours and re-signed by the same (other) principals: only the root differs.
    let writecap = Writecap::from_chain(vec![
        certificate(
            &other.admin,
            &other.writer,
            domain.path(&["a", "b"]),
            now_plus(DAY),
        ),
        certificate(
            &other.root,
            &other.admin,
            domain.path(&["a"]),
            now_plus(DAY),
        ),
    ]);
    assert_eq!(validate(&other.two_certs(), &other.target()), Ok(()));
    assert_eq!(
        validate(&writecap, &domain.target()),
        Err(WritecapError::NotSignedByRoot {
            expected: principal_of(&domain.root),
            found: principal_of(&other.root),
        })
    );
}

#[test]
fn rule_no_principal_may_be_revoked_subject() {
    let domain = Domain::new();
    let mut revoked = RevocationList::new();
    revoked.revoke(principal_of(&domain.writer));
    for writecap in [domain.one_cert(), domain.two_certs(), domain.three_certs()] {
        assert_eq!(
            writecap.validate(&domain.target(), NOW, &revoked),
            Err(WritecapError::Revoked(principal_of(&domain.writer)))
        );
    }
}

#[test]
fn rule_no_principal_may_be_revoked_intermediate_issuer() {
    let domain = Domain::new();
    let writecap = domain.three_certs();
    for intermediate in [&domain.sub, &domain.admin] {
        let mut revoked = RevocationList::new();
        revoked.revoke(principal_of(intermediate));
        assert_eq!(
            writecap.validate(&domain.target(), NOW, &revoked),
            Err(WritecapError::Revoked(principal_of(intermediate)))
        );
    }
    // Revoking someone outside the chain changes nothing.
    let mut unrelated = RevocationList::new();
    unrelated.revoke(principal_of(&domain.outsider));
    assert_eq!(writecap.validate(&domain.target(), NOW, &unrelated), Ok(()));
}

#[test]
fn rule_no_principal_may_be_revoked_the_root_as_issuer() {
    // The root is never a certificate's subject, only the last one's issuer.
    let domain = Domain::new();
    let mut revoked = RevocationList::new();
    revoked.revoke(principal_of(&domain.root));
    for writecap in [domain.one_cert(), domain.two_certs(), domain.three_certs()] {
        assert_eq!(
            writecap.validate(&domain.target(), NOW, &revoked),
            Err(WritecapError::Revoked(principal_of(&domain.root)))
        );
    }
}

#[test]
fn rule_validate_for_requires_the_holder_to_be_the_subject() {
    let domain = Domain::new();
    let writecap = domain.two_certs();
    assert_eq!(
        writecap.validate_for(
            &principal_of(&domain.admin),
            &domain.target(),
            NOW,
            &nobody_revoked()
        ),
        Err(WritecapError::WrongSubject {
            expected: principal_of(&domain.admin),
            found: principal_of(&domain.writer),
        })
    );
}

// ---- Writecap::issue --------------------------------------------------------

#[test]
fn issue_by_the_root() {
    let domain = Domain::new();
    let path = domain.path(&["a"]);
    let writecap = Writecap::issue(
        &domain.root,
        None,
        principal_of(&domain.admin),
        path.clone(),
        now_plus(DAY),
        NOW,
    )
    .unwrap();
    assert_eq!(writecap.chain().len(), 1);
    assert_eq!(writecap.subject(), Some(principal_of(&domain.admin)));
    assert_eq!(writecap.path(), Some(&path));
    assert_eq!(writecap.chain()[0].issuer, *domain.root.public());
    assert_eq!(validate(&writecap, &domain.target()), Ok(()));
}

#[test]
fn issue_by_a_delegate_within_its_authority() {
    let domain = Domain::new();
    let admin_cap = root_grant(
        &domain.root,
        &domain.admin,
        domain.path(&["a"]),
        now_plus(2 * DAY),
    );
    let writer_cap = Writecap::issue(
        &domain.admin,
        Some(&admin_cap),
        principal_of(&domain.writer),
        domain.path(&["a", "b"]),
        now_plus(DAY),
        NOW,
    )
    .unwrap();
    assert_eq!(writer_cap.chain().len(), 2);
    assert_eq!(writer_cap.chain()[1..], admin_cap.chain()[..]);
    assert_eq!(validate(&writer_cap, &domain.target()), Ok(()));

    // Up to its own expiry, and over its whole path, is still within authority.
    let same = Writecap::issue(
        &domain.admin,
        Some(&admin_cap),
        principal_of(&domain.sub),
        domain.path(&["a"]),
        now_plus(2 * DAY),
        NOW,
    )
    .unwrap();
    assert_eq!(validate(&same, &domain.target()), Ok(()));
}

#[test]
fn issue_by_a_delegate_outside_its_authority_is_refused() {
    let domain = Domain::new();
    let admin_cap = root_grant(
        &domain.root,
        &domain.admin,
        domain.path(&["a"]),
        now_plus(DAY),
    );
    for requested in [
        domain.path(&["x"]),
        domain.path(&[]),
        domain.path(&["ab"]),
        path_of(&domain.outsider, &["a"]),
    ] {
        assert_eq!(
            Writecap::issue(
                &domain.admin,
                Some(&admin_cap),
                principal_of(&domain.writer),
                requested.clone(),
                now_plus(DAY),
                NOW,
            ),
            Err(WritecapError::OutsideAuthority {
                requested,
                authority: domain.path(&["a"]),
            })
        );
    }
}

#[test]
fn issue_beyond_the_issuers_expiry_is_refused() {
    let domain = Domain::new();
    let admin_cap = root_grant(
        &domain.root,
        &domain.admin,
        domain.path(&["a"]),
        now_plus(DAY),
    );
    assert_eq!(
        Writecap::issue(
            &domain.admin,
            Some(&admin_cap),
            principal_of(&domain.writer),
            domain.path(&["a", "b"]),
            now_plus(DAY + 1),
            NOW,
        ),
        Err(WritecapError::ExpiresAfterIssuer {
            requested: now_plus(DAY + 1),
            limit: now_plus(DAY),
        })
    );
}

#[test]
fn issue_by_the_root_for_another_roots_path_is_refused() {
    let domain = Domain::new();
    let foreign = path_of(&domain.outsider, &["a"]);
    assert_eq!(
        Writecap::issue(
            &domain.root,
            None,
            principal_of(&domain.writer),
            foreign.clone(),
            now_plus(DAY),
            NOW,
        ),
        Err(WritecapError::OutsideAuthority {
            requested: foreign,
            authority: domain.path(&[]),
        })
    );
}

#[test]
fn issue_with_someone_elses_or_an_expired_writecap_is_refused() {
    let domain = Domain::new();
    let admin_cap = root_grant(
        &domain.root,
        &domain.admin,
        domain.path(&["a"]),
        now_plus(DAY),
    );
    assert_eq!(
        Writecap::issue(
            &domain.outsider,
            Some(&admin_cap),
            principal_of(&domain.writer),
            domain.path(&["a", "b"]),
            now_plus(100),
            NOW,
        ),
        Err(WritecapError::WrongSubject {
            expected: principal_of(&domain.outsider),
            found: principal_of(&domain.admin),
        })
    );
    assert_eq!(
        Writecap::issue(
            &domain.admin,
            Some(&admin_cap),
            principal_of(&domain.writer),
            domain.path(&["a", "b"]),
            now_plus(100),
            now_plus(DAY),
        ),
        Err(WritecapError::Expired {
            index: 0,
            expired: now_plus(DAY),
        })
    );
}

#[test]
fn issue_refuses_to_grow_a_chain_past_max_len() {
    let deep = DeepChain::new(MAX_CHAIN_LEN);
    let holder = &deep.holders[0];
    assert_eq!(
        Writecap::issue(
            holder,
            Some(&deep.writecap),
            principal_of(&signing_key()),
            deep.target.clone(),
            now_plus(DAY),
            NOW,
        ),
        Err(WritecapError::TooLong(MAX_CHAIN_LEN + 1))
    );
    // One shorter still grows by one.
    let shorter = DeepChain::new(MAX_CHAIN_LEN - 1);
    let grown = Writecap::issue(
        &shorter.holders[0],
        Some(&shorter.writecap),
        principal_of(&signing_key()),
        shorter.target.clone(),
        now_plus(DAY),
        NOW,
    )
    .unwrap();
    assert_eq!(grown.chain().len(), MAX_CHAIN_LEN);
    assert_eq!(validate(&grown, &shorter.target), Ok(()));
}

// ---- the binary format ------------------------------------------------------

#[test]
fn encode_decode_round_trip() {
    let domain = Domain::new();
    for writecap in [domain.one_cert(), domain.two_certs(), domain.three_certs()] {
        let encoded = encoding::encode(&writecap);
        assert_eq!(encoded[0], FORMAT_VERSION);
        assert_eq!(encoded[1], Kind::Writecap as u8);
        assert_eq!(encoding::kind_of(&encoded), Some(Kind::Writecap));
        let decoded: Writecap = encoding::decode(&encoded).unwrap();
        assert_eq!(decoded, writecap);
        assert_eq!(validate(&decoded, &domain.target()), Ok(()));
    }
    let mut revoked = RevocationList::new();
    revoked.revoke(principal_of(&domain.admin));
    let decoded: RevocationList = encoding::decode(&encoding::encode(&revoked)).unwrap();
    assert_eq!(decoded, revoked);
}

#[test]
fn decode_rejects_headers_garbage_and_trailing_bytes() {
    let domain = Domain::new();
    let encoded = encoding::encode(&domain.two_certs());
    assert_eq!(
        encoding::decode::<Writecap>(&[]),
        Err(DecodeError::Truncated(0))
    );
    assert_eq!(
        encoding::decode::<Writecap>(&[FORMAT_VERSION]),
        Err(DecodeError::Truncated(1))
    );
    let mut wrong_version = encoded.clone();
    wrong_version[0] = FORMAT_VERSION + 1;
    assert_eq!(
        encoding::decode::<Writecap>(&wrong_version),
        Err(DecodeError::UnsupportedVersion(FORMAT_VERSION + 1))
    );
    let mut wrong_kind = encoded.clone();
    wrong_kind[1] = Kind::FileMeta as u8;
    assert_eq!(
        encoding::decode::<Writecap>(&wrong_kind),
        Err(DecodeError::WrongKind {
            expected: Kind::Writecap,
            found: Kind::FileMeta as u8,
        })
    );
    let mut trailing = encoded.clone();
    trailing.push(0);
    assert_eq!(
        encoding::decode::<Writecap>(&trailing),
        Err(DecodeError::TrailingBytes(1))
    );
    let too_large = vec![0u8; 64 * 1024 + 1];
    assert!(matches!(
        encoding::decode::<Writecap>(&too_large),
        Err(DecodeError::TooLarge {
            kind: Kind::Writecap,
            ..
        })
    ));
    let mut garbage = vec![FORMAT_VERSION, Kind::Writecap as u8];
    garbage.extend((0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    assert!(encoding::decode::<Writecap>(&garbage).is_err());
    // A chain length far beyond the bytes present.
    let huge_count = [
        FORMAT_VERSION,
        Kind::Writecap as u8,
        0xff,
        0xff,
        0xff,
        0xff,
        0x0f,
    ];
    assert!(encoding::decode::<Writecap>(&huge_count).is_err());
}

#[test]
fn every_truncation_fails_to_decode() {
    let domain = Domain::new();
    let encoded = encoding::encode(&domain.two_certs());
    for len in 0..encoded.len() {
        assert!(
            encoding::decode::<Writecap>(&encoded[..len]).is_err(),
            "prefix of {len} bytes decoded"
        );
    }
}

#[test]
fn every_single_bit_flip_fails_to_decode_or_to_validate() {
    let domain = Domain::new();
    let target = domain.target();
    let encoded = encoding::encode(&domain.two_certs());
    for bit in 16..encoded.len() * 8 {
        let mut flipped = encoded.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        if let Ok(writecap) = encoding::decode::<Writecap>(&flipped) {
            assert!(
                validate(&writecap, &target).is_err(),
                "bit {bit} flipped and the writecap still validates"
            );
        }
    }
}

#[test]
fn a_validated_timestamp_boundary_is_exclusive() {
    let domain = Domain::new();
    let writecap = root_grant(
        &domain.root,
        &domain.writer,
        domain.path(&["a"]),
        Timestamp(NOW.0 + 1),
    );
    assert_eq!(
        writecap.validate(&domain.target(), NOW, &nobody_revoked()),
        Ok(())
    );
    assert_eq!(
        writecap.validate(&domain.target(), Timestamp(NOW.0 + 1), &nobody_revoked()),
        Err(WritecapError::Expired {
            index: 0,
            expired: Timestamp(NOW.0 + 1),
        })
    );
}
