//! bttp against a minimal raw-quinn echo, side by side in one run (issue #6).
//!
//! Both sides run in this process over 127.0.0.1: the servers on one thread
//! with a single-threaded Tokio runtime, the client on another, so each side has
//! a core. The anchor is plain quinn with the same rustls provider (aws-lc-rs,
//! TLS 1.3), the same certificate and the same transport parameters
//! (`blocktree_netstack::tls::transport_config` of the default limits), and
//! nothing of bttp: no frame, no writecap verification, no routing, a task per
//! stream that reads it to the end and echoes it. bttp is a client runtime
//! with credentials calling the echo service of a server runtime (mutual TLS,
//! writecaps verified at the handshake).
//!
//! Cases, each run by the anchor and then by bttp, `REPS` times:
//! - `latency`: `CALLS` sequential calls of 32 bytes, one in flight; p50 and p99
//!   of the round trip.
//! - `big`: `BIG` one-way messages of 64 KiB (bttp `send`, quinn a
//!   unidirectional stream each), timed until the server has received them all.
//! - `small`: `SMALL` one-way messages of 1 KiB, the same way.
//!
//! Results go to `bttp.json` in [`blocktree_benches::results_dir`], one record per
//! side, case and repetition; `benches/bttp.sh` turns them into the table.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blocktree_benches::{random_bytes, write_result};
use blocktree_core::BtPath;
use blocktree_core::keys::{Signer, SigningKeyPair};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::Writecap;
use blocktree_netstack::echo::{EchoCounters, EchoReply, EchoRequest, register_echo};
use blocktree_netstack::{
    AccessPolicy, AuthzAttrs, Credentials, Limits, Runtime, RuntimeConfig, RuntimeRecord,
    ServiceId, ServiceName, cert, tls,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_bytes::ByteBuf;

const SMALL_CALL: usize = 32;
const BIG_MESSAGE: usize = 64 * 1024;
const SMALL_MESSAGE: usize = 1024;
const READ_LIMIT: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A domain in memory: the root, a server and a client runtime.
struct Identities {
    server: Credentials,
    server_key: Arc<SigningKeyPair>,
    client: Credentials,
    echo_service: BtPath,
}

fn identities() -> Identities {
    let root = SigningKeyPair::generate().expect("root key");
    let now = Timestamp::now();
    let domain = BtPath::root_of(Signer::principal(&root));
    let issue = |name: &str| {
        let key = Arc::new(SigningKeyPair::generate().expect("runtime key"));
        let path = domain
            .join("bench")
            .and_then(|dir| dir.join(name))
            .expect("path");
        let writecap = Writecap::issue(
            &root,
            None,
            Signer::principal(&*key),
            path,
            now.after(Duration::from_secs(3600)),
            now,
        )
        .expect("writecap");
        let credentials = Credentials::new(key.clone(), writecap).expect("credentials");
        (key, credentials)
    };
    let (server_key, server) = issue("server");
    let (_, client) = issue("client");
    Identities {
        server,
        server_key,
        client,
        echo_service: domain.join("echo").expect("service path"),
    }
}

/// What the server thread hands the client.
struct Servers {
    raw_addr: SocketAddr,
    raw_received: Arc<AtomicU64>,
    bttp_addr: SocketAddr,
    bttp_counters: Arc<EchoCounters>,
}

/// The anchor's server: echo what a bidirectional stream brings, count what a
/// unidirectional one brings.
async fn raw_server(endpoint: quinn::Endpoint, received: Arc<AtomicU64>) {
    while let Some(incoming) = endpoint.accept().await {
        let received = received.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            loop {
                tokio::select! {
                    bi = connection.accept_bi() => {
                        let Ok((mut send, mut recv)) = bi else { break };
                        tokio::spawn(async move {
                            if let Ok(data) = recv.read_to_end(READ_LIMIT).await {
                                let _ = send.write_all(&data).await;
                                let _ = send.finish();
                            }
                        });
                    }
                    uni = connection.accept_uni() => {
                        let Ok(mut recv) = uni else { break };
                        let received = received.clone();
                        tokio::spawn(async move {
                            if let Ok(data) = recv.read_to_end(READ_LIMIT).await {
                                std::hint::black_box(data);
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                }
            }
        });
    }
}

fn raw_server_config(identities: &Identities) -> quinn::ServerConfig {
    let certificate =
        cert::build_certificate(&*identities.server_key, identities.server.writecap())
            .expect("certificate");
    let key = identities.server_key.to_pkcs8().expect("pkcs8").to_vec();
    let mut tls = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![certificate], PrivatePkcs8KeyDer::from(key).into())
        .expect("server certificate");
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(tls::transport_config(&Limits::default())));
    config
}

/// The anchor verifies nothing: it measures QUIC, not authentication (which
/// happens once per connection, outside the timed loops, on both sides).
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

fn raw_client_config() -> quinn::ClientConfig {
    let mut tls = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tls::transport_config(&Limits::default())));
    config
}

fn single_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("Tokio runtime")
}

/// Starts both servers on their own thread; they serve until the process ends.
fn start_servers(identities: &Identities) -> Servers {
    let raw_config = raw_server_config(identities);
    let server = identities.server.clone();
    let client_principal = identities.client.principal();
    let echo_service = identities.echo_service.clone();
    let (ready, servers) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name("servers".into());
    let spawned = thread.spawn(move || {
        single_thread().block_on(async move {
            let endpoint = quinn::Endpoint::server(raw_config, localhost()).expect("raw server");
            let raw_addr = endpoint.local_addr().expect("raw address");
            let raw_received = Arc::new(AtomicU64::new(0));
            tokio::spawn(raw_server(endpoint, raw_received.clone()));

            let record = RuntimeRecord {
                uid: 0,
                gid: 0,
                mode: 0o750,
                services: [echo_service.clone()].into(),
            };
            let access =
                AccessPolicy::new(record).with_principal(client_principal, AuthzAttrs::new(1, 0));
            let runtime = Runtime::start(RuntimeConfig::new(localhost(), access), server)
                .expect("bttp server");
            let bttp_counters = register_echo(&runtime, echo_service).expect("echo service");
            let bttp_addr = runtime.local_addr().expect("bttp address");
            ready
                .send(Servers {
                    raw_addr,
                    raw_received,
                    bttp_addr,
                    bttp_counters,
                })
                .expect("handing over the servers");
            std::future::pending::<()>().await;
        });
    });
    spawned.expect("server thread");
    servers.recv().expect("servers started")
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

struct Client {
    raw: quinn::Connection,
    bttp: Runtime,
    to: ServiceName,
}

impl Client {
    async fn raw_call(&self, payload: &[u8]) -> Vec<u8> {
        let (mut send, mut recv) = self.raw.open_bi().await.expect("raw stream");
        send.write_all(payload).await.expect("raw write");
        send.finish().expect("raw finish");
        recv.read_to_end(READ_LIMIT).await.expect("raw reply")
    }

    async fn bttp_call(&self, payload: &[u8]) -> Vec<u8> {
        let request = EchoRequest::Echo(ByteBuf::from(payload.to_vec()));
        match self.bttp.call(self.to.clone(), request, TIMEOUT).await {
            Ok(EchoReply::Echo(bytes)) => bytes.into_vec(),
            other => panic!("bttp call failed: {other:?}"),
        }
    }

    async fn raw_send(&self, payload: &[u8]) {
        let mut send = self.raw.open_uni().await.expect("raw stream");
        send.write_all(payload).await.expect("raw write");
        send.finish().expect("raw finish");
    }

    async fn bttp_send(&self, payload: &[u8]) {
        let request = EchoRequest::Echo(ByteBuf::from(payload.to_vec()));
        self.bttp
            .send(self.to.clone(), request)
            .await
            .expect("bttp send");
    }
}

/// Round trips of `count` sequential calls, sorted.
async fn latencies(client: &Client, raw: bool, count: usize) -> Vec<Duration> {
    let payload = random_bytes(1, SMALL_CALL);
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let reply = if raw {
            client.raw_call(&payload).await
        } else {
            client.bttp_call(&payload).await
        };
        samples.push(started.elapsed());
        assert_eq!(reply.len(), payload.len());
    }
    samples.sort();
    samples
}

/// Seconds to deliver `count` one-way messages of `size` bytes, and the seconds
/// the sender took to queue them (which side limits the rate).
async fn one_way(
    client: &Client,
    servers: &Servers,
    raw: bool,
    count: usize,
    size: usize,
) -> (f64, f64) {
    let payload = random_bytes(2, size);
    let received = || {
        if raw {
            servers.raw_received.load(Ordering::Relaxed)
        } else {
            servers.bttp_counters.snapshot().sends
        }
    };
    let target = received() + count as u64;
    let started = Instant::now();
    for _ in 0..count {
        if raw {
            client.raw_send(&payload).await;
        } else {
            client.bttp_send(&payload).await;
        }
    }
    let queued = started.elapsed().as_secs_f64();
    while received() < target {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    (started.elapsed().as_secs_f64(), queued)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let reps = env_number("REPS", 3);
    let calls = env_number("CALLS", 20000);
    let big = env_number("BIG", 10000);
    let small = env_number("SMALL", 100000);
    let identities = identities();
    let servers = start_servers(&identities);

    let mut json = String::from("[\n");
    single_thread().block_on(async {
        let mut endpoint = quinn::Endpoint::client(localhost()).expect("raw client");
        endpoint.set_default_client_config(raw_client_config());
        let raw = endpoint
            .connect(servers.raw_addr, tls::SERVER_NAME)
            .expect("raw connect")
            .await
            .expect("raw handshake");
        let access = AccessPolicy::new(RuntimeRecord {
            mode: 0o700,
            ..RuntimeRecord::default()
        });
        let bttp = Runtime::start(RuntimeConfig::new(localhost(), access), identities.client.clone())
            .expect("bttp client");
        let server_path = identities.server.path().clone();
        bttp.add_peer(server_path.clone(), servers.bttp_addr, [identities.echo_service.clone()]);
        let to = ServiceName {
            service: identities.echo_service.clone(),
            scope: server_path.parent().expect("server directory"),
            rootward: false,
            id: ServiceId::name("bench").expect("service id"),
        };
        let client = Client { raw, bttp, to };
        // Warm-up: connections, the provider actor, allocator and caches.
        latencies(&client, true, 1000).await;
        latencies(&client, false, 1000).await;

        let mut first = true;
        let mut record = |line: String| {
            if !first {
                json.push_str(",\n");
            }
            first = false;
            json.push_str(&line);
        };
        for rep in 1..=reps {
            for raw in [true, false] {
                let side = if raw { "raw" } else { "bttp" };
                let samples = latencies(&client, raw, calls).await;
                let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
                eprintln!("rep {rep} {side:>4} latency   p50 {p50:8.1} µs  p99 {p99:8.1} µs");
                record(format!(
                    r#"  {{"rep": {rep}, "side": "{side}", "case": "latency", "count": {calls}, "bytes": {SMALL_CALL}, "p50_us": {p50:.3}, "p99_us": {p99:.3}}}"#
                ));
            }
            for (case, count, size) in [("big", big, BIG_MESSAGE), ("small", small, SMALL_MESSAGE)] {
                for raw in [true, false] {
                    let side = if raw { "raw" } else { "bttp" };
                    let (seconds, queued) = one_way(&client, &servers, raw, count, size).await;
                    let per_second = count as f64 / seconds;
                    let bytes_per_second = per_second * size as f64;
                    eprintln!(
                        "rep {rep} {side:>4} {case:<9} {per_second:10.0} msg/s {:8.1} MB/s  (sender done at {:.0} %)",
                        bytes_per_second / 1e6,
                        queued / seconds * 100.0
                    );
                    record(format!(
                        r#"  {{"rep": {rep}, "side": "{side}", "case": "{case}", "count": {count}, "bytes": {size}, "seconds": {seconds:.6}, "sender_seconds": {queued:.6}, "messages_per_s": {per_second:.1}, "bytes_per_s": {bytes_per_second:.1}}}"#
                    ));
                }
            }
        }
        client.bttp.shutdown().await;
    });
    json.push_str("\n]\n");
    let mut summary = String::new();
    match write_result("bttp.json", &json) {
        Ok(path) => {
            let _ = write!(summary, "results: {}", path.display());
        }
        Err(error) => {
            let _ = write!(summary, "could not write bttp.json: {error}");
        }
    }
    eprintln!("{summary}");
}
