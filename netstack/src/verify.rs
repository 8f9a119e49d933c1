//! Peer verification: rustls verifiers that trust writecaps, not authorities.
//!
//! Both sides run the same checks on the peer's certificate ([`check_certificate`]):
//! exactly one certificate; an X.509 structure with a P-256 key and a writecap
//! extension ([`crate::cert::parse_certificate`]); the writecap issued to that
//! key's principal; and the writecap valid, at the handshake's clock and under
//! the runtime's revocation list, for the peer's path and signed by the root that
//! path names ([`Writecap::validate_for`]). What "the peer's path" is differs:
//!
//! - a client verifying a server checks the path it dialled, so a server can only
//!   answer for paths its writecap covers (`ServerVerifier`);
//! - a server verifying a client takes the path from the client's writecap and
//!   requires its domain to be one the runtime trusts (`ClientVerifier`).
//!
//! The handshake signature is then checked with the certificate's own key: it is
//! the peer's proof that it holds that key. Every failure has its own
//! [`VerifyError`], and maps to a distinct TLS alert so the refused side learns
//! why ([`crate::error::Refusal`]).

use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{RevocationList, Writecap, WritecapError};
use blocktree_core::{BtPath, PrincipalId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use thiserror::Error;

use crate::auth::AccessPolicy;
use crate::cert::{PeerCertificate, parse_certificate};

/// The one handshake signature scheme bttp speaks: what its P-256 keys make.
pub const SIGNATURE_SCHEME: SignatureScheme = SignatureScheme::ECDSA_NISTP256_SHA256;

/// How many recent refusals a runtime remembers for [`crate::Runtime::recent_refusals`].
const REFUSALS_KEPT: usize = 32;

/// Why a peer's certificate or handshake was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The certificate is not X.509 DER.
    #[error("the certificate does not parse: {0}")]
    Malformed(String),
    /// The certificate's key is not an ECDSA P-256 key.
    #[error("the certificate's key is not an ECDSA P-256 key")]
    NotP256,
    /// The certificate has no writecap extension.
    #[error("the certificate carries no writecap")]
    NoWritecap,
    /// The writecap extension does not decode.
    #[error("the certificate's writecap does not decode: {0}")]
    WritecapEncoding(String),
    /// More than the one self-signed certificate was presented.
    #[error("{0} certificates were presented; bttp takes exactly one, self-signed")]
    CertificateCount(usize),
    /// The writecap belongs to another principal than the certificate's key.
    #[error("the certificate's key belongs to {key}, but its writecap was issued to {subject}")]
    KeyNotSubject {
        /// The principal of the certificate's key.
        key: PrincipalId,
        /// The writecap's subject.
        subject: PrincipalId,
    },
    /// A client from a domain this runtime does not trust.
    #[error(
        "the peer's path {path} belongs to the domain of {root}, which this runtime does not trust"
    )]
    UntrustedDomain {
        /// The path the peer's writecap grants.
        path: BtPath,
        /// The root principal of that path.
        root: PrincipalId,
    },
    /// The writecap is not valid for the peer's path.
    #[error("the peer's writecap is not valid for {path}: {error}")]
    Writecap {
        /// The path checked.
        path: BtPath,
        /// The broken rule.
        error: Box<WritecapError>,
    },
    /// The handshake was signed with another scheme than [`SIGNATURE_SCHEME`].
    #[error("the handshake was signed with {0}; bttp accepts only ECDSA P-256 with SHA-256")]
    UnsupportedScheme(String),
    /// The handshake signature does not verify with the certificate's key.
    #[error("the handshake signature does not verify with the certificate's key")]
    BadHandshakeSignature,
    /// TLS 1.2 was attempted.
    #[error("the peer attempted TLS 1.2; bttp speaks TLS 1.3 only")]
    Tls12,
}

impl VerifyError {
    /// The rustls error whose alert tells the peer why it was refused: one alert
    /// per kind of failure, so each is distinct at the other end.
    pub(crate) fn to_rustls(&self) -> rustls::Error {
        let certificate_error = match self {
            VerifyError::Malformed(_)
            | VerifyError::NotP256
            | VerifyError::NoWritecap
            | VerifyError::WritecapEncoding(_)
            | VerifyError::CertificateCount(_) => CertificateError::BadEncoding,
            VerifyError::UntrustedDomain { .. } => CertificateError::UnknownIssuer,
            VerifyError::Writecap { error, .. } => match **error {
                WritecapError::NotSignedByRoot { .. } => CertificateError::UnknownIssuer,
                WritecapError::Expired { .. } => CertificateError::Expired,
                WritecapError::Revoked(_) => CertificateError::Revoked,
                WritecapError::BadSignature { .. } => CertificateError::BadSignature,
                _ => CertificateError::Other(OtherError(Arc::new(self.clone()))),
            },
            VerifyError::KeyNotSubject { .. } => {
                CertificateError::Other(OtherError(Arc::new(self.clone())))
            }
            VerifyError::UnsupportedScheme(_) | VerifyError::Tls12 => {
                return rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::NoSignatureSchemesInCommon,
                );
            }
            VerifyError::BadHandshakeSignature => CertificateError::BadSignature,
        };
        rustls::Error::InvalidCertificate(certificate_error)
    }
}

/// Checks a peer's certificate chain for `path` (see the module documentation).
pub fn check_certificate(
    end_entity: &[u8],
    intermediates: usize,
    path: &BtPath,
    now: Timestamp,
    revoked: &RevocationList,
) -> Result<PeerCertificate, VerifyError> {
    if intermediates != 0 {
        return Err(VerifyError::CertificateCount(intermediates + 1));
    }
    let peer = parse_certificate(end_entity)?;
    check_writecap(&peer, path, now, revoked)?;
    Ok(peer)
}

fn check_writecap(
    peer: &PeerCertificate,
    path: &BtPath,
    now: Timestamp,
    revoked: &RevocationList,
) -> Result<(), VerifyError> {
    let key = peer.key.principal();
    let subject = peer
        .writecap
        .subject()
        .ok_or_else(|| VerifyError::Writecap {
            path: path.clone(),
            error: Box::new(WritecapError::Empty),
        })?;
    if subject != key {
        return Err(VerifyError::KeyNotSubject { key, subject });
    }
    peer.writecap
        .validate_for(&key, path, now, revoked)
        .map_err(|error| VerifyError::Writecap {
            path: path.clone(),
            error: Box::new(error),
        })
}

/// Checks a client's certificate: its writecap's own path, in a trusted domain.
pub fn check_client_certificate(
    end_entity: &[u8],
    intermediates: usize,
    trusted_roots: &BTreeSet<PrincipalId>,
    now: Timestamp,
    revoked: &RevocationList,
) -> Result<PeerCertificate, VerifyError> {
    if intermediates != 0 {
        return Err(VerifyError::CertificateCount(intermediates + 1));
    }
    let peer = parse_certificate(end_entity)?;
    let path = peer
        .writecap
        .path()
        .cloned()
        .ok_or_else(|| VerifyError::Writecap {
            path: BtPath::root_of(peer.key.principal()),
            error: Box::new(WritecapError::Empty),
        })?;
    if !trusted_roots.contains(&path.root()) {
        return Err(VerifyError::UntrustedDomain {
            root: path.root(),
            path,
        });
    }
    check_writecap(&peer, &path, now, revoked)?;
    Ok(peer)
}

/// Checks that the peer's writecap still holds under `revoked` at `now`; used to
/// drop live connections when the revocation list grows.
pub(crate) fn still_valid(
    writecap: &Writecap,
    path: &BtPath,
    now: Timestamp,
    revoked: &RevocationList,
) -> bool {
    writecap
        .subject()
        .is_some_and(|subject| writecap.validate_for(&subject, path, now, revoked).is_ok())
}

fn verify_handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, VerifyError> {
    if dss.scheme != SIGNATURE_SCHEME {
        return Err(VerifyError::UnsupportedScheme(format!("{:?}", dss.scheme)));
    }
    let peer = parse_certificate(cert)?;
    let spki = peer.key.spki_der();
    rustls::crypto::verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(spki.as_slice()),
        dss,
        algorithms,
    )
    .map_err(|_| VerifyError::BadHandshakeSignature)
}

fn timestamp(now: UnixTime) -> Timestamp {
    Timestamp(now.as_secs())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the verifiers consult that an operator may change while the runtime
/// runs.
#[derive(Debug, Clone)]
pub(crate) struct SecurityState {
    /// Domains whose runtimes may connect as clients.
    pub trusted_roots: BTreeSet<PrincipalId>,
    /// Principals no longer honoured.
    pub revoked: RevocationList,
    /// Who may send unsolicited messages.
    pub access: AccessPolicy,
}

/// The runtime's shared verification state.
#[derive(Debug)]
pub(crate) struct Security {
    state: RwLock<SecurityState>,
    provider: Arc<CryptoProvider>,
    refusals: Mutex<VecDeque<VerifyError>>,
}

impl Security {
    pub fn new(state: SecurityState, provider: Arc<CryptoProvider>) -> Security {
        Security {
            state: RwLock::new(state),
            provider,
            refusals: Mutex::new(VecDeque::new()),
        }
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, SecurityState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn update(&self, change: impl FnOnce(&mut SecurityState)) {
        change(&mut self.state.write().unwrap_or_else(PoisonError::into_inner));
    }

    fn refused(&self, side: &str, error: &VerifyError) {
        tracing::warn!("bttp: refused a {side} certificate: {error}");
        let mut refusals = lock(&self.refusals);
        if refusals.len() == REFUSALS_KEPT {
            refusals.pop_front();
        }
        refusals.push_back(error.clone());
    }

    pub fn recent_refusals(&self) -> Vec<VerifyError> {
        lock(&self.refusals).iter().cloned().collect()
    }

    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

/// The server side's check of client certificates (mutual TLS, or anonymous
/// where the runtime's file lets others execute it).
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    security: Arc<Security>,
}

impl ClientVerifier {
    pub fn new(security: Arc<Security>) -> ClientVerifier {
        ClientVerifier { security }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.security.read().access.admits_anonymous()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verdict = {
            let state = self.security.read();
            check_client_certificate(
                end_entity,
                intermediates.len(),
                &state.trusted_roots,
                timestamp(now),
                &state.revoked,
            )
        };
        match verdict {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(error) => {
                self.security.refused("client", &error);
                Err(error.to_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.security.refused("client", &VerifyError::Tls12);
        Err(VerifyError::Tls12.to_rustls())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss, self.security.algorithms()).map_err(
            |error| {
                self.security.refused("client", &error);
                error.to_rustls()
            },
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SIGNATURE_SCHEME]
    }
}

/// The client side's check of one server, made for one dial: the server must
/// answer for `expected`, the path being dialled. It keeps its verdict so the
/// dialler can report the precise reason, or learn the server's writecap.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    expected: BtPath,
    security: Arc<Security>,
    verdict: Mutex<Option<Result<PeerCertificate, VerifyError>>>,
}

impl ServerVerifier {
    pub fn new(expected: BtPath, security: Arc<Security>) -> ServerVerifier {
        ServerVerifier {
            expected,
            security,
            verdict: Mutex::new(None),
        }
    }

    /// The certificate accepted, or why it was refused; `None` before the server
    /// presented one.
    pub fn verdict(&self) -> Option<Result<PeerCertificate, VerifyError>> {
        lock(&self.verdict).clone()
    }

    fn record<T>(&self, result: Result<T, VerifyError>) -> Result<T, rustls::Error> {
        result.map_err(|error| {
            self.security.refused("server", &error);
            let rustls_error = error.to_rustls();
            *lock(&self.verdict) = Some(Err(error));
            rustls_error
        })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = {
            let state = self.security.read();
            check_certificate(
                end_entity,
                intermediates.len(),
                &self.expected,
                timestamp(now),
                &state.revoked,
            )
        };
        let peer = self.record(verdict)?;
        *lock(&self.verdict) = Some(Ok(peer));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.record(Err(VerifyError::Tls12))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.record(verify_handshake_signature(
            message,
            cert,
            dss,
            self.security.algorithms(),
        ))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SIGNATURE_SCHEME]
    }
}
