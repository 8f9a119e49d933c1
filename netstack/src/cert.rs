//! bttp certificates: self-signed X.509 certificates that carry a writecap.
//!
//! A runtime presents a certificate for its own credential key, signed by that
//! key, with its writecap chain (core's versioned encoding, in a DER OCTET
//! STRING) in the extension [`WRITECAP_EXTENSION_OID`]. Nothing in the
//! certificate but the key and the writecap is trusted: the peer proves it holds
//! the key with the TLS 1.3 handshake signature, and the writecap proves the key
//! speaks for a path (see [`crate::verify`]). The validity dates are the widest
//! rcgen writes, because the writecap's expiry is the one that counts.
//!
//! Signing goes through core's [`Signer`], so a key that never leaves a TPM can
//! sign certificates and handshakes alike; [`ecdsa_der`] turns its fixed-width
//! r || s signatures into the DER ECDSA-Sig-Value that X.509 and TLS expect.

use blocktree_core::encoding;
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::keys::{Signature, Signer, SigningPublicKey};
use blocktree_core::writecap::Writecap;
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    KeyIdMethod, KeyUsagePurpose, PublicKeyData, SerialNumber, SignatureAlgorithm, SigningKey,
};
use rustls::pki_types::CertificateDer;
use std::sync::Arc;
use thiserror::Error;
use x509_cert::der::asn1::{ObjectIdentifier, OctetString};
use x509_cert::der::{Decode, Encode};

use crate::verify::VerifyError;

/// The OID of the writecap extension, as arcs.
///
/// An unregistered arc of the private-enterprise space, chosen far above the
/// numbers IANA has assigned; it must be replaced by a registered one before
/// bttp certificates meet software outside Blocktree.
pub const WRITECAP_EXTENSION_OID: [u64; 9] = [1, 3, 6, 1, 4, 1, 4_294_967_294, 6, 1];

fn writecap_oid() -> ObjectIdentifier {
    // The constant above is well formed; building it cannot fail.
    match ObjectIdentifier::new("1.3.6.1.4.1.4294967294.6.1") {
        Ok(oid) => oid,
        Err(error) => unreachable!("the writecap OID is malformed: {error}"),
    }
}

/// A signer that can be shared with rustls's handshake threads.
pub type SharedSigner = Arc<dyn Signer + Send + Sync>;

/// Why a certificate could not be built.
#[derive(Debug, Error)]
pub enum CertError {
    /// The writecap was issued to another key.
    #[error("the writecap was issued to {subject:?}, not to the signing key's principal {key}")]
    WrongKey {
        /// The writecap's subject.
        subject: Option<blocktree_core::PrincipalId>,
        /// The signer's principal.
        key: blocktree_core::PrincipalId,
    },
    /// rcgen refused the parameters or the signer failed.
    #[error("building the certificate failed: {0}")]
    Build(String),
}

/// The DER ECDSA-Sig-Value `SEQUENCE { r INTEGER, s INTEGER }` of an r || s
/// signature.
pub fn ecdsa_der(signature: &Signature) -> Vec<u8> {
    let (r, s) = signature.as_bytes().split_at(32);
    let (r, s) = (der_unsigned(r), der_unsigned(s));
    // Each INTEGER is at most 35 bytes, so the short length form always fits.
    let mut out = Vec::with_capacity(2 + r.len() + s.len());
    out.push(0x30);
    out.push((r.len() + s.len()) as u8);
    out.extend_from_slice(&r);
    out.extend_from_slice(&s);
    out
}

/// A DER INTEGER holding the unsigned big-endian `bytes` (at most 32).
fn der_unsigned(bytes: &[u8]) -> Vec<u8> {
    let first = bytes
        .iter()
        .position(|byte| *byte != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    let digits = &bytes[first..];
    let pad = digits.first().is_some_and(|byte| byte & 0x80 != 0);
    let mut out = Vec::with_capacity(3 + digits.len());
    out.push(0x02);
    out.push((digits.len() + usize::from(pad)) as u8);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
    out
}

/// rcgen's view of a core signer.
struct RcgenKey<'a> {
    signer: &'a dyn Signer,
    public: SigningPublicKey,
}

impl PublicKeyData for RcgenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.public.as_sec1()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for RcgenKey<'_> {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.signer
            .sign(message)
            .map(|signature| ecdsa_der(&signature))
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// Builds the self-signed certificate that presents `writecap` for `signer`'s key.
pub fn build_certificate(
    signer: &dyn Signer,
    writecap: &Writecap,
) -> Result<CertificateDer<'static>, CertError> {
    let public = signer.public_key();
    if writecap.subject() != Some(public.principal()) {
        return Err(CertError::WrongKey {
            subject: writecap.subject(),
            key: public.principal(),
        });
    }
    let build = |error: &dyn std::fmt::Display| CertError::Build(error.to_string());
    let mut serial = [0u8; 16];
    blocktree_core::aead::random_fill(&mut serial).map_err(|e| build(&e))?;
    // A positive INTEGER of at most 20 bytes, as RFC 5280 asks.
    serial[0] &= 0x7f;
    let key_id = HashAlgorithm::Sha256.hash(&[&public.spki_der()]);
    let extension = OctetString::new(encoding::encode(writecap))
        .and_then(|octets| octets.to_der())
        .map_err(|e| build(&e))?;

    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, public.principal().to_string());
    let mut params = CertificateParams::default();
    params.distinguished_name = name;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.key_identifier_method = KeyIdMethod::PreSpecified(key_id.as_bytes()[..20].to_vec());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        &WRITECAP_EXTENSION_OID,
        extension,
    )];
    let key = RcgenKey { signer, public };
    let cert = params.self_signed(&key).map_err(|e| build(&e))?;
    Ok(cert.der().clone())
}

/// What a peer's certificate claims: its key and its writecap. Parsing checks
/// only the structure; [`crate::verify`] decides whether to believe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The certificate's ECDSA P-256 key.
    pub key: SigningPublicKey,
    /// The writecap from the certificate's extension.
    pub writecap: Writecap,
}

/// Extracts the key and the writecap from a certificate's DER.
pub fn parse_certificate(der: &[u8]) -> Result<PeerCertificate, VerifyError> {
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|error| VerifyError::Malformed(error.to_string()))?;
    let tbs = cert.tbs_certificate();
    let spki = tbs.subject_public_key_info();
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or(VerifyError::NotP256)?;
    let key = SigningPublicKey::from_sec1(point).map_err(|_| VerifyError::NotP256)?;
    // Anything but exactly the P-256 SubjectPublicKeyInfo of that point (another
    // algorithm or curve claimed for the same bytes) is refused.
    let spki_der = spki
        .to_der()
        .map_err(|error| VerifyError::Malformed(error.to_string()))?;
    if spki_der != key.spki_der() {
        return Err(VerifyError::NotP256);
    }

    let oid = writecap_oid();
    let mut found = tbs
        .extensions()
        .into_iter()
        .flatten()
        .filter(|extension| extension.extn_id == oid);
    let extension = found.next().ok_or(VerifyError::NoWritecap)?;
    if found.next().is_some() {
        return Err(VerifyError::Malformed(
            "more than one writecap extension".into(),
        ));
    }
    let octets = OctetString::from_der(extension.extn_value.as_bytes())
        .map_err(|error| VerifyError::WritecapEncoding(error.to_string()))?;
    let writecap: Writecap = encoding::decode(octets.as_bytes())
        .map_err(|error| VerifyError::WritecapEncoding(error.to_string()))?;
    Ok(PeerCertificate { key, writecap })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
    use blocktree_core::BtPath;
    use blocktree_core::keys::SigningKeyPair;
    use blocktree_core::time::Timestamp;

    fn writecap_for(key: &SigningKeyPair) -> (SigningKeyPair, Writecap) {
        let root = SigningKeyPair::generate().unwrap();
        let path = BtPath::root_of(Signer::principal(&root))
            .join("rt")
            .unwrap();
        let now = Timestamp::now();
        let writecap = Writecap::issue(
            &root,
            None,
            Signer::principal(key),
            path,
            now.after(std::time::Duration::from_secs(3600)),
            now,
        )
        .unwrap();
        (root, writecap)
    }

    #[test]
    fn der_signatures_verify_with_an_asn1_verifier() {
        let key = SigningKeyPair::generate().unwrap();
        for round in 0..64u8 {
            let message = [round; 17];
            let signature = key.sign(&message).unwrap();
            let der = ecdsa_der(&signature);
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public().as_sec1())
                .verify(&message, &der)
                .unwrap();
        }
    }

    #[test]
    fn the_oid_parsed_is_the_oid_written() {
        let arcs: Vec<u64> = writecap_oid().arcs().map(u64::from).collect();
        assert_eq!(arcs, WRITECAP_EXTENSION_OID);
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        assert_eq!(der_unsigned(&[0; 32]), vec![0x02, 1, 0]);
        let mut high = [0u8; 32];
        high[0] = 0x80;
        let encoded = der_unsigned(&high);
        assert_eq!(&encoded[..3], &[0x02, 33, 0]);
        let mut small = [0u8; 32];
        small[31] = 0x7f;
        assert_eq!(der_unsigned(&small), vec![0x02, 1, 0x7f]);
    }

    #[test]
    fn certificate_carries_key_and_writecap() {
        let key = SigningKeyPair::generate().unwrap();
        let (_, writecap) = writecap_for(&key);
        let der = build_certificate(&key, &writecap).unwrap();
        let parsed = parse_certificate(&der).unwrap();
        assert_eq!(parsed.key, *key.public());
        assert_eq!(parsed.writecap, writecap);
    }

    #[test]
    fn certificate_is_refused_for_someone_elses_writecap() {
        let key = SigningKeyPair::generate().unwrap();
        let other = SigningKeyPair::generate().unwrap();
        let (_, writecap) = writecap_for(&other);
        assert!(matches!(
            build_certificate(&key, &writecap),
            Err(CertError::WrongKey { .. })
        ));
    }

    #[test]
    fn garbage_and_truncations_are_errors() {
        let key = SigningKeyPair::generate().unwrap();
        let (_, writecap) = writecap_for(&key);
        let der = build_certificate(&key, &writecap).unwrap();
        assert!(parse_certificate(&[]).is_err());
        for cut in (0..der.len()).step_by(7) {
            assert!(parse_certificate(&der[..cut]).is_err(), "cut at {cut}");
        }
    }
}
