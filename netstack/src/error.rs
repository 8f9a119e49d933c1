//! Errors of the bttp runtime.

use std::fmt;
use std::time::Duration;
use thiserror::Error;

use crate::frame::{FrameError, RemoteError};
use crate::verify::VerifyError;

/// Why a peer refused our handshake, as its TLS alert tells it.
///
/// Each of bttp's refusals has its own alert (see
/// [`crate::verify::VerifyError`]), so the refused side can say why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Our certificate or writecap does not parse (`bad_certificate`).
    BadCertificate,
    /// Our writecap has expired (`certificate_expired`).
    Expired,
    /// A principal in our writecap is revoked (`certificate_revoked`).
    Revoked,
    /// Our writecap is from a domain the peer does not trust, or not signed by
    /// our path's root (`unknown_ca`).
    UntrustedRoot,
    /// A signature in our writecap, or our handshake signature, does not verify
    /// (`decrypt_error`).
    BadSignature,
    /// Our writecap's chain is not a valid delegation for our path: paths not
    /// nested, a broken chain, another subject (`certificate_unknown`).
    InvalidWritecap,
    /// The peer requires credentials and we connected anonymously
    /// (`certificate_required`): others lack execute permission on it.
    CredentialsRequired,
    /// No protocol, version or signature scheme in common (`handshake_failure`,
    /// `no_application_protocol`, `protocol_version`).
    Incompatible,
    /// Any other alert, by its code.
    Alert(u8),
}

impl Refusal {
    /// The refusal a TLS alert code stands for.
    pub fn from_alert(alert: u8) -> Refusal {
        match alert {
            42 => Refusal::BadCertificate,
            45 => Refusal::Expired,
            44 => Refusal::Revoked,
            48 => Refusal::UntrustedRoot,
            51 => Refusal::BadSignature,
            46 => Refusal::InvalidWritecap,
            116 => Refusal::CredentialsRequired,
            40 | 70 | 120 => Refusal::Incompatible,
            other => Refusal::Alert(other),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadCertificate => f.write_str("our certificate or writecap is malformed"),
            Refusal::Expired => f.write_str("our writecap has expired"),
            Refusal::Revoked => f.write_str("a principal in our writecap is revoked"),
            Refusal::UntrustedRoot => {
                f.write_str("our writecap is from a domain it does not trust")
            }
            Refusal::BadSignature => f.write_str("a signature in our writecap does not verify"),
            Refusal::InvalidWritecap => {
                f.write_str("our writecap is not a valid delegation for our path")
            }
            Refusal::CredentialsRequired => {
                f.write_str("it does not admit anonymous clients (others lack execute permission)")
            }
            Refusal::Incompatible => f.write_str("no protocol version or scheme in common"),
            Refusal::Alert(code) => write!(f, "TLS alert {code}"),
        }
    }
}

/// What went wrong in the runtime, on a connection or with a message.
#[derive(Debug, Error, Clone)]
pub enum BttpError {
    /// A call got no reply within its timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection carrying a message closed before it was answered.
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost {
        /// The peer's path or address.
        peer: String,
        /// Why the connection closed.
        reason: String,
    },
    /// The peer refused our handshake.
    #[error("{peer} refused the handshake: {refusal}")]
    Refused {
        /// The peer's path.
        peer: String,
        /// Why, from its alert.
        refusal: Refusal,
    },
    /// We refused the peer's certificate.
    #[error("refused the certificate of {peer}: {error}")]
    PeerRejected {
        /// The path we dialled.
        peer: String,
        /// Why.
        error: VerifyError,
    },
    /// Connecting failed for another reason (no answer, bad address).
    #[error("cannot connect to {peer}: {reason}")]
    Connect {
        /// The peer's path and address.
        peer: String,
        /// What failed.
        reason: String,
    },
    /// Recent attempts to reach the peer failed and the next is not due before
    /// the message's deadline.
    #[error("{peer} is unreachable, next attempt in {retry_in:?}; last failure: {last}")]
    Backoff {
        /// The peer's path.
        peer: String,
        /// When the next connection attempt is due.
        retry_in: Duration,
        /// The failure that started the wait.
        last: Box<BttpError>,
    },
    /// No known runtime can receive messages for the name.
    #[error("no route to {0}")]
    NoRoute(String),
    /// The receiver refused the message.
    #[error("{peer} refused the message: {error}")]
    Rejected {
        /// The receiving runtime.
        peer: String,
        /// Its reason.
        error: RemoteError,
    },
    /// The receiver dropped a call without replying.
    #[error("the receiver dropped the call without replying")]
    NoReply,
    /// The caller is gone (timed out, or its connection closed) before the reply.
    #[error("the caller is gone: {0}")]
    CallerGone(String),
    /// A message or reply of another type than expected.
    #[error("the message is not a {expected}")]
    WrongType {
        /// The type asked for.
        expected: &'static str,
    },
    /// A message or reply that does not decode as its type.
    #[error("the message does not decode as {expected}: {reason}")]
    Decode {
        /// The type asked for.
        expected: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// A frame that could not be encoded or decoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer broke the bttp protocol.
    #[error("protocol violation by {peer}: {reason}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What it did.
        reason: String,
    },
    /// Hosting actors or services needs credentials; this runtime is anonymous.
    #[error("an anonymous runtime hosts no actors or services")]
    NoIdentity,
    /// The runtime's file does not list the service.
    #[error("the runtime's file does not permit registering service {0}")]
    ServiceNotPermitted(String),
    /// The service is already registered in this runtime.
    #[error("service {0} is already registered in this runtime")]
    ServiceRegistered(String),
    /// Credentials that cannot be used.
    #[error("credentials: {0}")]
    Credentials(String),
    /// A configuration that cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// Binding the socket failed.
    #[error("cannot bind {addr}: {reason}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The operating system's reason.
        reason: String,
    },
    /// The runtime is shut down.
    #[error("the runtime is shut down")]
    ShutDown,
}
