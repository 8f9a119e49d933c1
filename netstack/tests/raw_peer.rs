//! A peer that speaks raw QUIC to a runtime and breaks the bttp protocol gets
//! an error on its stream, and the runtime reads no more than the prefix of a
//! message it refuses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_netstack::echo::{EchoReply, register_echo};
use blocktree_netstack::frame::{self, ErrorCode, Frame, FrameKind, RequestHeader, VERSION};
use blocktree_netstack::{AccessPolicy, Limits, Name, Runtime, RuntimeConfig, tls};
use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This peer does not care who the server is; the server is what is tested.
#[derive(Debug)]
struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ECDSA_NISTP256_SHA256]
    }
}

async fn raw_connection(server: &Runtime) -> quinn::Connection {
    let mut tls = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tls::transport_config(&Limits::default())));
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    endpoint
        .connect_with(config, server.local_addr().unwrap(), tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

/// Writes `bytes` on a new bidirectional stream (finishing it unless `hold`)
/// and returns the frame the server answers with.
async fn exchange(connection: &quinn::Connection, bytes: &[u8], hold: bool) -> Frame {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    // A write the server stopped reading fails; its answer still comes.
    let _ = send.write_all(bytes).await;
    if !hold {
        let _ = send.finish();
    }
    let answer = recv.read_to_end(1 << 20).await.unwrap();
    frame::decode(&answer, 1 << 20).unwrap()
}

fn refusal(frame: Frame) -> ErrorCode {
    match frame {
        Frame::Error(error) => error.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn protocol_violations_get_errors_on_their_stream() {
    let domain = Domain::new();
    let store = domain.store(&["servers", "a"]);
    let echo_service = domain.echo_service();
    let mut config = RuntimeConfig::new(
        loopback(),
        AccessPolicy::new(record(0, 0, 0o751, &[&echo_service])),
    );
    config.limits.request_timeout = Duration::from_millis(300);
    config.limits.max_message_size = 64 * 1024;
    let server = Runtime::start(config, store.credentials()).unwrap();
    let counters = register_echo(&server, echo_service.clone()).unwrap();
    let connection = raw_connection(&server).await;

    let call = |payload: &[u8]| {
        let header = RequestHeader {
            from: None,
            to: Name::Service(echo_name(&domain, &store.path)),
        };
        frame::encode_request(FrameKind::Call, &header, &echo(payload), 1 << 20).unwrap()
    };

    // A well-formed call works over raw QUIC.
    match exchange(&connection, &call(b"hi"), false).await {
        Frame::Reply { payload } => {
            let reply: EchoReply = postcard::from_bytes(&payload).unwrap();
            assert_eq!(echoed(reply), b"hi");
        }
        other => panic!("{other:?}"),
    }

    // Another frame version.
    let mut future = call(b"hi");
    future[0] = VERSION + 1;
    assert_eq!(
        refusal(exchange(&connection, &future, false).await),
        ErrorCode::Malformed
    );

    // A prefix that declares 1 GiB: refused from the prefix alone.
    let mut huge = call(b"hi")[..frame::PREFIX_LEN].to_vec();
    huge[4..8].copy_from_slice(&(1u32 << 30).to_le_bytes());
    assert_eq!(
        refusal(exchange(&connection, &huge, true).await),
        ErrorCode::TooLarge
    );

    // Over the server's limit, though under the client's.
    assert_eq!(
        refusal(exchange(&connection, &call(&vec![0; 100 * 1024]), false).await),
        ErrorCode::TooLarge
    );

    // A prefix and then silence: the stream is answered after request_timeout.
    let started = Instant::now();
    let stalled = &call(b"stalled")[..frame::PREFIX_LEN + 3];
    assert_eq!(
        refusal(exchange(&connection, stalled, true).await),
        ErrorCode::RequestTimeout
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A reply frame where a call belongs, and a call cut short.
    let reply = frame::encode_reply(&1u8, 1024).unwrap();
    assert_eq!(
        refusal(exchange(&connection, &reply, false).await),
        ErrorCode::Malformed
    );
    let cut = call(b"cut");
    assert_eq!(
        refusal(exchange(&connection, &cut[..cut.len() - 1], false).await),
        ErrorCode::Malformed
    );

    // A message the echo service cannot open is refused to its caller.
    let header = RequestHeader {
        from: None,
        to: Name::Service(echo_name(&domain, &store.path)),
    };
    let garbage = frame::encode_request(FrameKind::Call, &header, &[0xffu8; 4][..], 1024).unwrap();
    assert_eq!(
        refusal(exchange(&connection, &garbage, false).await),
        ErrorCode::Malformed
    );

    assert_eq!(
        counters.snapshot().calls,
        1,
        "only the good call reached the service"
    );
    // The connection survived all of it.
    assert!(matches!(
        exchange(&connection, &call(b"again"), false).await,
        Frame::Reply { .. }
    ));
}
