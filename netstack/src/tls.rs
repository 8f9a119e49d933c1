//! rustls and QUIC configuration: TLS 1.3 only, aws-lc-rs, bttp's verifiers.
//!
//! Session resumption and 0-RTT are off: a resumed session would skip the
//! certificate check, so a revoked or expired writecap could keep connecting.

use blocktree_core::writecap::Writecap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::server::NoServerSessionStorage;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::cert::{SharedSigner, build_certificate, ecdsa_der};
use crate::config::Limits;
use crate::error::BttpError;
use crate::frame::{MAX_HEADER_LEN, PREFIX_LEN};
use crate::verify::{ClientVerifier, SIGNATURE_SCHEME, ServerVerifier};

/// The ALPN protocol id of this version of bttp.
pub const ALPN: &[u8] = b"bttp/1";
/// The server name given to QUIC; bttp names servers by path, checked by the
/// verifier, so this is a placeholder and SNI is not sent.
pub const SERVER_NAME: &str = "bttp";

/// The aws-lc-rs provider restricted to TLS 1.3 suites.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .retain(|suite| suite.version() == &rustls::version::TLS13);
    Arc::new(provider)
}

fn config_error(error: impl std::fmt::Display) -> BttpError {
    BttpError::Config(format!("TLS: {error}"))
}

/// The QUIC transport parameters that enforce `limits`.
pub fn transport_config(limits: &Limits) -> TransportConfig {
    let mut transport = TransportConfig::default();
    let streams = VarInt::from_u32(limits.max_streams_per_peer);
    transport
        .max_concurrent_bidi_streams(streams)
        .max_concurrent_uni_streams(streams)
        .max_idle_timeout(IdleTimeout::try_from(limits.idle_timeout).ok())
        .keep_alive_interval(Some(limits.idle_timeout / 3))
        .datagram_receive_buffer_size(None);
    // A stream's window need not hold a whole message: the reader takes it in
    // as it arrives, into a buffer its budget already paid for.
    let received = limits.receive_window as u64;
    let largest_frame = (limits.max_message_size + MAX_HEADER_LEN + PREFIX_LEN) as u64;
    let window = |bytes: u64| VarInt::from_u64(bytes).unwrap_or(VarInt::MAX);
    transport
        .receive_window(window(received))
        .stream_receive_window(window(largest_frame.min(received)))
        .send_window(received);
    transport
}

/// The QUIC server configuration of a runtime with credentials.
pub(crate) fn server_config(
    certified: Arc<CertifiedKey>,
    verifier: Arc<ClientVerifier>,
    provider: Arc<CryptoProvider>,
    limits: &Limits,
) -> Result<quinn::ServerConfig, BttpError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.session_storage = Arc::new(NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(config_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(limits)));
    Ok(config)
}

/// The QUIC client configuration for one dial, with our certificate (`None`:
/// anonymous) and a verifier for the server expected there.
pub(crate) fn client_config(
    certified: Option<Arc<CertifiedKey>>,
    verifier: Arc<ServerVerifier>,
    provider: Arc<CryptoProvider>,
    limits: &Limits,
) -> Result<quinn::ClientConfig, BttpError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match certified {
        Some(certified) => {
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_sni = false;
    tls.resumption = Resumption::disabled();
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(tls).map_err(config_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(limits)));
    Ok(config)
}

/// How long to wait for a closing endpoint to tell its peers.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The certificate and handshake key of a runtime, signing through its
/// credential store's [`blocktree_core::keys::Signer`].
pub(crate) fn certified_key(
    signer: SharedSigner,
    writecap: &Writecap,
) -> Result<Arc<CertifiedKey>, BttpError> {
    let der = build_certificate(&*signer, writecap)
        .map_err(|error| BttpError::Credentials(error.to_string()))?;
    let spki = signer.public_key().spki_der();
    let key = Arc::new(HandshakeKey { signer, spki });
    Ok(Arc::new(CertifiedKey::new(vec![der], key)))
}

/// rustls's view of a core signer.
struct HandshakeKey {
    signer: SharedSigner,
    spki: Vec<u8>,
}

impl fmt::Debug for HandshakeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandshakeKey({})", self.signer.principal())
    }
}

impl rustls::sign::SigningKey for HandshakeKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered.contains(&SIGNATURE_SCHEME).then(|| {
            Box::new(HandshakeSigner(self.signer.clone())) as Box<dyn rustls::sign::Signer>
        })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

struct HandshakeSigner(SharedSigner);

impl fmt::Debug for HandshakeSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandshakeSigner({})", self.0.principal())
    }
}

impl rustls::sign::Signer for HandshakeSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .sign(message)
            .map(|signature| ecdsa_der(&signature))
            .map_err(|error| rustls::Error::General(format!("signing the handshake: {error}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SIGNATURE_SCHEME
    }
}
