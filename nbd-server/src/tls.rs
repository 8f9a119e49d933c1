//! The server's TLS configuration: a certificate chain and its private key, in
//! PEM files, for rustls on aws-lc-rs. TLS 1.2 and 1.3. With a client CA, every
//! client must present a certificate that chains to it (mutual TLS), which is how
//! NBD clients are authenticated; without one, no client certificate is asked for.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

/// Why the TLS configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no certificate.
    #[error("cannot read a certificate from {path}: {why}")]
    Certificate {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The key file is unreadable or holds no private key.
    #[error("cannot read a private key from {path}: {why}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The client CA file is unreadable, holds no certificate, or one rustls
    /// cannot use as a trust anchor.
    #[error("cannot use {path} as the client certificate authority: {why}")]
    ClientCa {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("the certificate and key are not usable: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's TLS configuration.
pub type TlsConfig = Arc<ServerConfig>;

/// A rustls server configuration from the PEM certificate chain in `cert` (the
/// server's certificate first) and the PEM private key in `key`; with
/// `client_ca`, a PEM file of CA certificates, clients must present a
/// certificate issued under one of them.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsConfig, TlsError> {
    let certificate_error = |why: String| TlsError::Certificate {
        path: cert.display().to_string(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|error| certificate_error(error.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|error| certificate_error(error.to_string()))?;
    if certs.is_empty() {
        return Err(certificate_error("no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::Key {
        path: key.display().to_string(),
        why: error.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    }
    .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A verifier that accepts client certificates issued under the CAs in `path`.
fn client_verifier(
    path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let error = |why: String| TlsError::ClientCa {
        path: path.display().to_string(),
        why,
    };
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(path).map_err(|e| error(e.to_string()))? {
        roots
            .add(certificate.map_err(|e| error(e.to_string()))?)
            .map_err(|e| error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(error("no CERTIFICATE block".into()));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| error(e.to_string()))
}
