//! Writecaps: certificate chains that delegate write authority over a path.
//!
//! A writecap is a chain of certificates, first the one issued to the writer,
//! last the one the root principal signed. Each certificate grants its
//! `issued_to` principal authority over `path` until `expires`, signed by
//! `issuer`. The original design links certificates with a `next` pointer; here
//! the chain is a bounded vector in the same order, so a hostile encoding cannot
//! nest deeply enough to exhaust the decoder's stack.
//!
//! A writecap is valid for a target path only when every rule of
//! [`Writecap::validate`] holds; each broken rule has its own [`WritecapError`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use thiserror::Error;

use crate::encoding::{Encodable, Kind};
use crate::keys::{CryptoError, Signature, Signer, SigningPublicKey};
use crate::path::BtPath;
use crate::principal::PrincipalId;
use crate::time::Timestamp;

/// The longest chain accepted: deeper delegation than this is a configuration
/// error, and the bound keeps validation cheap.
pub const MAX_CHAIN_LEN: usize = 16;

const SIGNING_CONTEXT: &[u8] = b"blocktree writecap certificate v1\0";

/// One link of a writecap chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The principal granted authority.
    pub issued_to: PrincipalId,
    /// The subtree the authority covers.
    pub path: BtPath,
    /// When the grant lapses.
    pub expires: Timestamp,
    /// The key that signed this certificate.
    pub issuer: SigningPublicKey,
    /// The issuer's signature over the fields above.
    pub signature: Signature,
}

#[derive(Serialize)]
struct SignedFields<'a> {
    issued_to: &'a PrincipalId,
    path: &'a BtPath,
    expires: Timestamp,
    issuer: &'a SigningPublicKey,
}

fn signed_bytes(
    issued_to: &PrincipalId,
    path: &BtPath,
    expires: Timestamp,
    issuer: &SigningPublicKey,
) -> Vec<u8> {
    let fields = SignedFields {
        issued_to,
        path,
        expires,
        issuer,
    };
    match postcard::to_extend(&fields, SIGNING_CONTEXT.to_vec()) {
        Ok(bytes) => bytes,
        Err(error) => unreachable!("serializing certificate fields failed: {error}"),
    }
}

impl Certificate {
    /// Has `issuer` sign a certificate granting `issued_to` authority over `path`.
    pub fn sign(
        issuer: &dyn Signer,
        issued_to: PrincipalId,
        path: BtPath,
        expires: Timestamp,
    ) -> Result<Certificate, CryptoError> {
        let issuer_key = issuer.public_key();
        let signature = issuer.sign(&signed_bytes(&issued_to, &path, expires, &issuer_key))?;
        Ok(Certificate {
            issued_to,
            path,
            expires,
            issuer: issuer_key,
            signature,
        })
    }

    fn verify_signature(&self) -> Result<(), CryptoError> {
        let bytes = signed_bytes(&self.issued_to, &self.path, self.expires, &self.issuer);
        self.issuer.verify(&bytes, &self.signature)
    }
}

/// Principals whose writecaps a domain no longer honours.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    revoked: BTreeSet<PrincipalId>,
}

impl RevocationList {
    /// An empty list.
    pub fn new() -> RevocationList {
        RevocationList::default()
    }

    /// Adds `principal`.
    pub fn revoke(&mut self, principal: PrincipalId) {
        self.revoked.insert(principal);
    }

    /// True if `principal` is revoked.
    pub fn is_revoked(&self, principal: &PrincipalId) -> bool {
        self.revoked.contains(principal)
    }

    /// The revoked principals.
    pub fn iter(&self) -> impl Iterator<Item = &PrincipalId> {
        self.revoked.iter()
    }
}

impl Encodable for RevocationList {
    const KIND: Kind = Kind::RevocationList;
}

/// Why a writecap is not valid, or cannot be issued.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WritecapError {
    /// A chain with no certificates.
    #[error("empty writecap")]
    Empty,
    /// More than [`MAX_CHAIN_LEN`] certificates.
    #[error("writecap chain has {0} certificates; the limit is {MAX_CHAIN_LEN}")]
    TooLong(usize),
    /// A signature that does not verify.
    #[error("certificate {index} of the writecap has an invalid signature")]
    BadSignature {
        /// Position in the chain (0 is the writer's).
        index: usize,
    },
    /// A certificate signed by someone other than the next certificate's subject.
    #[error(
        "certificate {index} was signed by {issuer}, but the next certificate was issued to {next_subject}"
    )]
    BrokenChain {
        /// Position of the certificate whose issuer does not match.
        index: usize,
        /// Who signed it.
        issuer: PrincipalId,
        /// Who holds the next certificate.
        next_subject: PrincipalId,
    },
    /// The target is outside the writer's certificate.
    #[error("writecap covers {covered}, not {target}")]
    PathNotCovered {
        /// The path written to.
        target: BtPath,
        /// The path of the first certificate.
        covered: BtPath,
    },
    /// A certificate whose path is not inside the path of the next one.
    #[error(
        "certificate {index} covers {path}, which is not inside {issuer_path}, the path of its issuer's certificate"
    )]
    PathsNotNested {
        /// Position of the certificate that reaches too far.
        index: usize,
        /// Its path.
        path: BtPath,
        /// The path of the next certificate.
        issuer_path: BtPath,
    },
    /// A certificate past its expiry.
    #[error("certificate {index} of the writecap expired at {expired}")]
    Expired {
        /// Position in the chain.
        index: usize,
        /// When it expired.
        expired: Timestamp,
    },
    /// The last certificate was not signed by the path's root principal.
    #[error("writecap is rooted at {found}, but the path belongs to {expected}")]
    NotSignedByRoot {
        /// The root principal named by the path.
        expected: PrincipalId,
        /// Who signed the last certificate.
        found: PrincipalId,
    },
    /// A principal in the chain is on the revocation list.
    #[error("principal {0} in the writecap is revoked")]
    Revoked(PrincipalId),
    /// The writecap belongs to another principal.
    #[error("writecap was issued to {found}, not {expected}")]
    WrongSubject {
        /// Who should hold it.
        expected: PrincipalId,
        /// Whom it was issued to.
        found: PrincipalId,
    },
    /// An issuer asked to grant more than it holds.
    #[error("cannot grant {requested}: the issuer's authority covers {authority}")]
    OutsideAuthority {
        /// The path asked for.
        requested: BtPath,
        /// What the issuer may delegate.
        authority: BtPath,
    },
    /// An issuer asked to grant beyond its own expiry.
    #[error("cannot grant until {requested}: the issuer's writecap expires at {limit}")]
    ExpiresAfterIssuer {
        /// The expiry asked for.
        requested: Timestamp,
        /// The issuer's own expiry.
        limit: Timestamp,
    },
    /// Signing failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// A chain of certificates granting write authority, writer's first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writecap {
    chain: Vec<Certificate>,
}

impl Encodable for Writecap {
    const KIND: Kind = Kind::Writecap;
    const MAX_LEN: usize = 64 * 1024;
}

impl Writecap {
    /// Wraps a chain as is; [`Writecap::validate`] decides whether it is any good.
    pub fn from_chain(chain: Vec<Certificate>) -> Writecap {
        Writecap { chain }
    }

    /// The certificates, writer's first.
    pub fn chain(&self) -> &[Certificate] {
        &self.chain
    }

    /// The principal this writecap grants authority to.
    pub fn subject(&self) -> Option<PrincipalId> {
        self.chain.first().map(|cert| cert.issued_to)
    }

    /// The subtree this writecap grants.
    pub fn path(&self) -> Option<&BtPath> {
        self.chain.first().map(|cert| &cert.path)
    }

    /// The earliest expiry in the chain: when the writecap stops working.
    pub fn expires(&self) -> Option<Timestamp> {
        self.chain.iter().map(|cert| cert.expires).min()
    }

    /// Checks that this writecap lets its subject write `target` at time `now`.
    ///
    /// Valid only if: the chain is non-empty and at most [`MAX_CHAIN_LEN`] long;
    /// every signature verifies; each certificate's issuer is the principal the
    /// next certificate was issued to; `target` lies inside the first
    /// certificate's path and each path lies inside the next one's; none has
    /// expired; the last was signed by the root principal that `target` names;
    /// and no principal in the chain is revoked.
    pub fn validate(
        &self,
        target: &BtPath,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<(), WritecapError> {
        self.check(target, now, revoked, true)
    }

    /// [`Writecap::validate`] without verifying the certificates' signatures, for
    /// a chain byte-identical to one whose signatures were verified before (a
    /// store sees one writer's chain on every batch). Paths, issuers, expiry,
    /// revocation and the root are checked as always.
    pub fn validate_known_signatures(
        &self,
        target: &BtPath,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<(), WritecapError> {
        self.check(target, now, revoked, false)
    }

    fn check(
        &self,
        target: &BtPath,
        now: Timestamp,
        revoked: &RevocationList,
        signatures: bool,
    ) -> Result<(), WritecapError> {
        let Some(first) = self.chain.first() else {
            return Err(WritecapError::Empty);
        };
        if self.chain.len() > MAX_CHAIN_LEN {
            return Err(WritecapError::TooLong(self.chain.len()));
        }
        if !first.path.contains(target) {
            return Err(WritecapError::PathNotCovered {
                target: target.clone(),
                covered: first.path.clone(),
            });
        }
        for (index, cert) in self.chain.iter().enumerate() {
            if signatures {
                cert.verify_signature()
                    .map_err(|_| WritecapError::BadSignature { index })?;
            }
            if now >= cert.expires {
                return Err(WritecapError::Expired {
                    index,
                    expired: cert.expires,
                });
            }
            let issuer = cert.issuer.principal();
            for principal in [cert.issued_to, issuer] {
                if revoked.is_revoked(&principal) {
                    return Err(WritecapError::Revoked(principal));
                }
            }
            match self.chain.get(index + 1) {
                Some(next) => {
                    if issuer != next.issued_to {
                        return Err(WritecapError::BrokenChain {
                            index,
                            issuer,
                            next_subject: next.issued_to,
                        });
                    }
                    if !next.path.contains(&cert.path) {
                        return Err(WritecapError::PathsNotNested {
                            index,
                            path: cert.path.clone(),
                            issuer_path: next.path.clone(),
                        });
                    }
                }
                None => {
                    if issuer != target.root() {
                        return Err(WritecapError::NotSignedByRoot {
                            expected: target.root(),
                            found: issuer,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Writecap::validate`], and also that the writecap was issued to `holder`.
    pub fn validate_for(
        &self,
        holder: &PrincipalId,
        target: &BtPath,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<(), WritecapError> {
        self.check_subject(holder)?;
        self.validate(target, now, revoked)
    }

    /// [`Writecap::validate_for`] for a chain whose signatures were verified
    /// before; see [`Writecap::validate_known_signatures`].
    pub fn validate_for_known_signatures(
        &self,
        holder: &PrincipalId,
        target: &BtPath,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<(), WritecapError> {
        self.check_subject(holder)?;
        self.validate_known_signatures(target, now, revoked)
    }

    fn check_subject(&self, holder: &PrincipalId) -> Result<(), WritecapError> {
        let subject = self.subject().ok_or(WritecapError::Empty)?;
        if subject != *holder {
            return Err(WritecapError::WrongSubject {
                expected: *holder,
                found: subject,
            });
        }
        Ok(())
    }

    /// Issues a writecap for `issued_to` over `path` until `expires`.
    ///
    /// With no `issuer_writecap`, `issuer` must be the root principal `path`
    /// names. Otherwise `issuer_writecap` must be the issuer's own valid writecap
    /// covering `path`, and the grant may not outlive it.
    pub fn issue(
        issuer: &dyn Signer,
        issuer_writecap: Option<&Writecap>,
        issued_to: PrincipalId,
        path: BtPath,
        expires: Timestamp,
        now: Timestamp,
    ) -> Result<Writecap, WritecapError> {
        let issuer_principal = issuer.principal();
        let mut chain = match issuer_writecap {
            None => {
                if issuer_principal != path.root() {
                    return Err(WritecapError::OutsideAuthority {
                        requested: path,
                        authority: BtPath::root_of(issuer_principal),
                    });
                }
                Vec::new()
            }
            Some(writecap) => {
                let authority = writecap.path().cloned().ok_or(WritecapError::Empty)?;
                if !authority.contains(&path) {
                    return Err(WritecapError::OutsideAuthority {
                        requested: path,
                        authority,
                    });
                }
                writecap.validate_for(&issuer_principal, &path, now, &RevocationList::new())?;
                let limit = writecap.expires().ok_or(WritecapError::Empty)?;
                if expires > limit {
                    return Err(WritecapError::ExpiresAfterIssuer {
                        requested: expires,
                        limit,
                    });
                }
                if writecap.chain.len() >= MAX_CHAIN_LEN {
                    return Err(WritecapError::TooLong(writecap.chain.len() + 1));
                }
                writecap.chain.clone()
            }
        };
        chain.insert(0, Certificate::sign(issuer, issued_to, path, expires)?);
        Ok(Writecap { chain })
    }
}
