//! Runtimes in one process talking over 127.0.0.1 (and ::1): delivery, routing,
//! authorization, limits, connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::BtPath;
use blocktree_core::keys::Signer;
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{RevocationList, Writecap, WritecapError};
use blocktree_netstack::echo::{EchoReply, EchoRequest, register_echo};
use blocktree_netstack::frame::ErrorCode;
use blocktree_netstack::verify::VerifyError;
use blocktree_netstack::{
    AccessPolicy, BttpError, DYNAMIC_PORTS_START, Name, Refusal, Runtime, RuntimeConfig, ServiceId,
    ServiceName,
};
use common::*;
use serde::{Deserialize, Serialize, Serializer};
use serde_bytes::ByteBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SECOND: Duration = Duration::from_secs(1);
const FIVE_SECONDS: Duration = Duration::from_secs(5);

static SERIALIZED: AtomicUsize = AtomicUsize::new(0);

/// A message that counts its serializations.
#[derive(Debug, Deserialize)]
struct Counted {
    data: Vec<u8>,
}

impl Serialize for Counted {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SERIALIZED.fetch_add(1, Ordering::SeqCst);
        self.data.serialize(serializer)
    }
}

#[tokio::test]
async fn local_messages_are_moved_not_serialized_or_copied() {
    let domain = Domain::new();
    let runtime = client(domain.store(&["rt"]).credentials());
    let mut mailbox = runtime.register_actor().unwrap();
    let to = Name::Actor(mailbox.name().clone());

    let data = vec![7u8; 1 << 20];
    let address = data.as_ptr();
    runtime.send(to.clone(), Counted { data }).await.unwrap();
    let envelope = mailbox.recv().await.unwrap();
    assert!(!envelope.is_call());
    let (message, reply) = envelope.open::<Counted>().unwrap();
    assert!(reply.is_none());
    assert_eq!(message.data.as_ptr(), address, "the buffer was copied");

    let server = tokio::spawn(async move {
        let envelope = mailbox.recv().await.unwrap();
        let (message, reply) = envelope.open::<Counted>().unwrap();
        reply.unwrap().send(message).await.unwrap();
        mailbox
    });
    let data = vec![9u8; 4096];
    let address = data.as_ptr();
    let reply: Counted = runtime
        .call(to, Counted { data }, FIVE_SECONDS)
        .await
        .unwrap();
    assert_eq!(reply.data.as_ptr(), address, "the reply was copied");
    assert_eq!(SERIALIZED.load(Ordering::SeqCst), 0);
    drop(server.await.unwrap());
}

#[tokio::test]
async fn local_type_mismatch_and_dropped_calls_are_errors() {
    let domain = Domain::new();
    let runtime = client(domain.store(&["rt"]).credentials());
    let mut mailbox = runtime.register_actor().unwrap();
    let to = Name::Actor(mailbox.name().clone());
    let server = tokio::spawn(async move {
        // The first call is opened as the wrong type; the second is dropped.
        let first = mailbox.recv().await.unwrap();
        assert!(matches!(
            first.open::<u64>(),
            Err(BttpError::WrongType { .. })
        ));
        let second = mailbox.recv().await.unwrap();
        drop(second);
        mailbox
    });
    let wrong: Result<u8, _> = runtime
        .call(to.clone(), "text".to_string(), FIVE_SECONDS)
        .await;
    assert!(
        matches!(&wrong, Err(BttpError::Rejected { error, .. }) if error.code == ErrorCode::Malformed),
        "{wrong:?}"
    );
    let dropped: Result<u8, _> = runtime.call(to.clone(), 1u8, FIVE_SECONDS).await;
    assert!(matches!(dropped, Err(BttpError::NoReply)), "{dropped:?}");
    let mailbox = server.await.unwrap();
    let name = mailbox.name().clone();
    drop(mailbox);
    let gone = runtime.send(name, 1u8).await;
    assert!(
        matches!(&gone, Err(BttpError::Rejected { error, .. }) if error.code == ErrorCode::NoSuchActor),
        "{gone:?}"
    );
}

/// Two runtimes of one domain: calls by service name and by actor name, the
/// sender's name as the receiver sees it, and a call back over the connection
/// the client opened.
#[tokio::test]
async fn runtimes_call_each_other_over_one_connection() {
    let domain = Domain::new();
    let server_store = domain.store(&["servers", "a"]);
    let client_store = domain.store(&["clients", "b"]);
    let echo_service = domain.echo_service();
    let server = start_runtime(server_store.credentials(), 0o750, &[&echo_service]);
    let mut server_access = AccessPolicy::new(record(0, 0, 0o750, &[&echo_service]));
    server_access
        .principals
        .insert(client_store.principal, attrs(0, 0));
    server.set_access(server_access);
    register_echo(&server, echo_service.clone()).unwrap();

    let client_runtime = {
        let access = AccessPolicy::new(record(0, 0, 0o750, &[]))
            .with_principal(server_store.principal, attrs(5, 0));
        Runtime::start(
            RuntimeConfig::new(loopback(), access),
            client_store.credentials(),
        )
        .unwrap()
    };
    client_runtime.add_peer(
        server_store.path.clone(),
        server.local_addr().unwrap(),
        [echo_service.clone()],
    );
    let to = echo_name(&domain, &server_store.path);
    for round in 0..50u8 {
        let reply: EchoReply = client_runtime
            .call(to.clone(), echo(&[round; 3]), FIVE_SECONDS)
            .await
            .unwrap();
        assert_eq!(echoed(reply), vec![round; 3]);
    }
    assert_eq!(client_runtime.open_connections(), 1);
    assert_eq!(server.open_connections(), 1);

    // The server learns the client's path from its certificate, and calls an
    // actor of the client over the connection the client opened.
    let mut server_actor = server.register_actor().unwrap();
    let mut client_actor = client_runtime.register_actor().unwrap();
    let server_name = server_actor.name().clone();
    client_runtime
        .send_from(client_actor.name(), server_name.clone(), 41u32)
        .await
        .unwrap();
    let envelope = server_actor.recv().await.unwrap();
    assert_eq!(envelope.sender(), Some(client_actor.name()));
    assert_eq!(envelope.peer().path(), Some(&client_store.path));
    let (number, _) = envelope.open::<u32>().unwrap();
    let back_to = envelope_sender_name(client_actor.name());
    let answer = tokio::spawn(async move {
        let envelope = client_actor.recv().await.unwrap();
        let (question, reply) = envelope.open::<u32>().unwrap();
        reply.unwrap().send(question + 1).await.unwrap();
        client_actor
    });
    let reply: u32 = server
        .call_from(&server_name, back_to, number, FIVE_SECONDS)
        .await
        .unwrap();
    assert_eq!(reply, 42);
    drop(answer.await.unwrap());
    assert_eq!(
        server.open_connections(),
        1,
        "the server dialled a second connection"
    );
}

fn envelope_sender_name(name: &blocktree_netstack::ActorName) -> Name {
    Name::Actor(name.clone())
}

/// Without execute permission a peer's calls are refused and its sends
/// dropped; replies to calls it answers still flow.
#[tokio::test]
async fn peers_without_execute_permission_are_refused() {
    let domain = Domain::new();
    let server_store = domain.store(&["servers", "a"]);
    let client_store = domain.store(&["clients", "b"]);
    let echo_service = domain.echo_service();
    // Owner uid 0, group 0, mode 0o750; the client is uid 7 in group 7: others.
    let access = AccessPolicy::new(record(0, 0, 0o750, &[&echo_service]))
        .with_principal(client_store.principal, attrs(7, 7));
    let server = Runtime::start(
        RuntimeConfig::new(loopback(), access),
        server_store.credentials(),
    )
    .unwrap();
    let counters = register_echo(&server, echo_service.clone()).unwrap();
    let client_runtime = client(client_store.credentials());
    client_runtime.add_peer(
        server_store.path.clone(),
        server.local_addr().unwrap(),
        [echo_service.clone()],
    );
    let to = echo_name(&domain, &server_store.path);
    let refused: Result<EchoReply, _> = client_runtime
        .call(to.clone(), echo(b"x"), FIVE_SECONDS)
        .await;
    match refused {
        Err(BttpError::Rejected { error, .. }) => {
            assert_eq!(error.code, ErrorCode::NotAuthorized);
            assert!(error.detail.contains("execute permission"), "{error}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    client_runtime.send(to, echo(b"y")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(counters.snapshot().calls + counters.snapshot().sends, 0);
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_connection_survives() {
    let domain = Domain::new();
    let server_store = domain.store(&["servers", "a"]);
    let echo_service = domain.echo_service();
    let mut config = RuntimeConfig::new(
        loopback(),
        AccessPolicy::new(record(0, 0, 0o751, &[&echo_service])),
    );
    config.limits.max_message_size = 64 * 1024;
    let server = Runtime::start(config, server_store.credentials()).unwrap();
    let counters = register_echo(&server, echo_service.clone()).unwrap();
    let client_runtime = Runtime::anonymous(RuntimeConfig::anonymous()).unwrap();
    client_runtime.add_peer(
        server_store.path.clone(),
        server.local_addr().unwrap(),
        [echo_service],
    );
    let to = echo_name(&domain, &server_store.path);
    let big: Result<EchoReply, _> = client_runtime
        .call(to.clone(), echo(&vec![1; 100 * 1024]), FIVE_SECONDS)
        .await;
    assert!(
        matches!(&big, Err(BttpError::Rejected { error, .. }) if error.code == ErrorCode::TooLarge),
        "{big:?}"
    );
    let small: EchoReply = client_runtime
        .call(to, echo(&vec![2; 1000]), FIVE_SECONDS)
        .await
        .unwrap();
    assert_eq!(echoed(small), vec![2; 1000]);
    assert_eq!(counters.snapshot().calls, 1);
    assert_eq!(client_runtime.open_connections(), 1);

    // The sender checks its own limit before sending anything.
    let mut config = RuntimeConfig::anonymous();
    config.limits.max_message_size = 1024;
    let small_client = Runtime::anonymous(config).unwrap();
    small_client.add_peer(
        server_store.path.clone(),
        server.local_addr().unwrap(),
        [domain.echo_service()],
    );
    let refused = small_client
        .send(echo_name(&domain, &server_store.path), echo(&[0; 2048]))
        .await;
    assert!(matches!(refused, Err(BttpError::Frame(_))), "{refused:?}");
    assert_eq!(
        small_client.open_connections(),
        0,
        "it connected to send nothing"
    );
}

/// The server must answer for the path that was dialled, with a valid writecap.
#[tokio::test]
async fn clients_refuse_servers_that_cannot_prove_the_path() {
    let domain = Domain::new();
    let echo_service = domain.echo_service();
    let now = Timestamp::now();
    let dialled = domain.path(&["servers", "a"]);
    type Case = (&'static str, BtPath, Timestamp, fn(&WritecapError) -> bool);
    let cases: [Case; 2] = [
        (
            "a writecap for another runtime's path",
            domain.path(&["servers", "b"]),
            now.after(Duration::from_secs(60)),
            |error| matches!(error, WritecapError::PathNotCovered { .. }),
        ),
        (
            "an expired writecap",
            dialled.clone(),
            Timestamp(now.0 - 10),
            |error| matches!(error, WritecapError::Expired { .. }),
        ),
    ];
    for (what, path, expires, expected) in cases {
        let (_, credentials) = key_credentials(|principal| {
            Writecap::issue(&*domain.root_signer(), None, principal, path, expires, now).unwrap()
        });
        let server = start_runtime(credentials, 0o751, &[&echo_service]);
        register_echo(&server, echo_service.clone()).unwrap();
        let client_runtime = Runtime::anonymous(RuntimeConfig::anonymous()).unwrap();
        client_runtime.add_peer(
            dialled.clone(),
            server.local_addr().unwrap(),
            [echo_service.clone()],
        );
        let result: Result<EchoReply, _> = client_runtime
            .call(echo_name(&domain, &dialled), echo(b"x"), FIVE_SECONDS)
            .await;
        let is_expected = |error: &VerifyError| matches!(error, VerifyError::Writecap { error, .. } if expected(error));
        match result {
            Err(BttpError::PeerRejected { error, .. }) => {
                assert!(is_expected(&error), "{what}: wrong reason {error}")
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        assert!(
            client_runtime.recent_refusals().iter().any(is_expected),
            "{what}"
        );
    }
}

#[tokio::test]
async fn revoking_a_connected_peer_closes_its_connection() {
    let domain = Domain::new();
    let server_store = domain.store(&["servers", "a"]);
    let client_store = domain.store(&["clients", "b"]);
    let echo_service = domain.echo_service();
    let server = start_runtime(server_store.credentials(), 0o751, &[&echo_service]);
    register_echo(&server, echo_service.clone()).unwrap();
    let client_runtime = client(client_store.credentials());
    client_runtime.add_peer(
        server_store.path.clone(),
        server.local_addr().unwrap(),
        [echo_service],
    );
    let to = echo_name(&domain, &server_store.path);
    let _: EchoReply = client_runtime
        .call(to.clone(), echo(b"before"), FIVE_SECONDS)
        .await
        .unwrap();
    let mut revoked = RevocationList::new();
    revoked.revoke(client_store.principal);
    server.set_revocations(revoked);
    // The live connection is closed; reconnecting is refused at the handshake.
    let mut last = None;
    for _ in 0..20 {
        match client_runtime
            .call::<_, EchoReply>(to.clone(), echo(b"after"), FIVE_SECONDS)
            .await
        {
            Err(BttpError::Refused { refusal, .. }) => {
                assert_eq!(refusal, Refusal::Revoked);
                return;
            }
            other => last = Some(other),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never refused as revoked; last: {last:?}");
}

#[tokio::test]
async fn unreachable_peers_back_off() {
    let domain = Domain::new();
    let nobody = domain.path(&["servers", "gone"]);
    let mut config = RuntimeConfig::anonymous();
    config.limits.handshake_timeout = Duration::from_millis(300);
    config.limits.backoff_initial = SECOND;
    let runtime = Runtime::anonymous(config).unwrap();
    // A bound socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    runtime.add_peer(nobody.clone(), silent.local_addr().unwrap(), []);
    let to = Name::Actor(blocktree_netstack::ActorName::new(nobody, uuid_of(1)));
    let first = runtime.send(to.clone(), 1u8).await;
    assert!(matches!(first, Err(BttpError::Connect { .. })), "{first:?}");
    let started = Instant::now();
    let second: Result<u8, _> = runtime
        .call(to.clone(), 1u8, Duration::from_millis(200))
        .await;
    assert!(
        matches!(second, Err(BttpError::Backoff { .. })),
        "{second:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "backoff should fail fast"
    );
    let unknown = runtime
        .send(
            Name::Service(ServiceName {
                service: domain.echo_service(),
                scope: domain.path(&[]),
                rootward: true,
                id: ServiceId::name("x").unwrap(),
            }),
            1u8,
        )
        .await;
    assert!(matches!(unknown, Err(BttpError::NoRoute(_))), "{unknown:?}");
}

fn uuid_of(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(n)
}

#[tokio::test]
async fn rootward_service_names_reach_the_closest_provider() {
    let domain = Domain::new();
    let echo_service = domain.echo_service();
    let near_store = domain.store(&["a", "b", "near"]);
    let far_store = domain.store(&["a", "far"]);
    let near = start_runtime(near_store.credentials(), 0o751, &[&echo_service]);
    let far = start_runtime(far_store.credentials(), 0o751, &[&echo_service]);
    let near_counters = register_echo(&near, echo_service.clone()).unwrap();
    let far_counters = register_echo(&far, echo_service.clone()).unwrap();
    let client_runtime = Runtime::anonymous(RuntimeConfig::anonymous()).unwrap();
    client_runtime.add_peer(
        near_store.path.clone(),
        near.local_addr().unwrap(),
        [echo_service.clone()],
    );
    client_runtime.add_peer(
        far_store.path.clone(),
        far.local_addr().unwrap(),
        [echo_service.clone()],
    );
    let name = |scope: &[&str], rootward| ServiceName {
        service: echo_service.clone(),
        scope: domain.path(scope),
        rootward,
        id: ServiceId::name("p").unwrap(),
    };
    let call = |to: ServiceName| {
        let client_runtime = client_runtime.clone();
        async move {
            client_runtime
                .call::<_, EchoReply>(to, EchoRequest::Stats, FIVE_SECONDS)
                .await
        }
    };
    // From a/b/c rootward: a/b (near) is closer than a (far).
    call(name(&["a", "b", "c"], true)).await.unwrap();
    assert_eq!(
        (
            near_counters.snapshot().calls,
            far_counters.snapshot().calls
        ),
        (1, 0)
    );
    // From a rootward or directly: only far is in a.
    call(name(&["a"], true)).await.unwrap();
    call(name(&["a"], false)).await.unwrap();
    assert_eq!(
        (
            near_counters.snapshot().calls,
            far_counters.snapshot().calls
        ),
        (1, 2)
    );
    // Directly in a/b/c: nobody.
    assert!(matches!(
        call(name(&["a", "b", "c"], false)).await,
        Err(BttpError::NoRoute(_))
    ));
    // A receiver outside the scope refuses even if the sender routes it there.
    client_runtime.add_peer(
        far_store.path.clone(),
        far.local_addr().unwrap(),
        [echo_service.clone()],
    );
    let misrouted = client_runtime
        .call::<_, EchoReply>(
            blocktree_netstack::ActorName::new(far_store.path.clone(), uuid_of(9)),
            EchoRequest::Stats,
            FIVE_SECONDS,
        )
        .await;
    assert!(
        matches!(&misrouted, Err(BttpError::Rejected { error, .. }) if error.code == ErrorCode::NoSuchActor),
        "{misrouted:?}"
    );
}

#[tokio::test]
async fn services_need_the_runtime_files_permission_and_spawn_providers_per_id() {
    let domain = Domain::new();
    let store = domain.store(&["rt"]);
    let allowed = domain.path(&["services", "counter"]);
    let runtime = start_runtime(store.credentials(), 0o700, &[&allowed]);
    let refused = runtime.register_service(domain.path(&["services", "other"]), |_, _| {});
    assert!(
        matches!(refused, Err(BttpError::ServiceNotPermitted(_))),
        "{refused:?}"
    );
    let spawned = std::sync::Arc::new(AtomicUsize::new(0));
    let count = spawned.clone();
    runtime
        .register_service(allowed.clone(), move |id, mut mailbox| {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut seen = 0u32;
                while let Some(envelope) = mailbox.recv().await {
                    let (_, reply) = envelope.open::<()>().unwrap();
                    seen += 1;
                    reply.unwrap().send((id.to_string(), seen)).await.unwrap();
                }
            });
        })
        .unwrap();
    assert!(matches!(
        runtime.register_service(allowed.clone(), |_, _| {}),
        Err(BttpError::ServiceRegistered(_))
    ));
    let to = |id: &str| ServiceName {
        service: allowed.clone(),
        scope: domain.path(&[]),
        rootward: false,
        id: ServiceId::name(id).unwrap(),
    };
    let mut replies = Vec::new();
    for id in ["x", "y", "x", "x"] {
        let reply: (String, u32) = runtime.call(to(id), (), FIVE_SECONDS).await.unwrap();
        replies.push(reply);
    }
    assert_eq!(
        replies,
        [
            ("\"x\"".to_string(), 1),
            ("\"y\"".to_string(), 1),
            ("\"x\"".to_string(), 2),
            ("\"x\"".to_string(), 3)
        ]
    );
    assert_eq!(spawned.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn random_ports_are_dynamic_and_ipv6_works() {
    let domain = Domain::new();
    let echo_service = domain.echo_service();
    let store = domain.store(&["rt"]);
    let server = start_runtime(store.credentials(), 0o751, &[&echo_service]);
    let port = server.local_addr().unwrap().port();
    assert!(port >= DYNAMIC_PORTS_START, "port {port}");

    let v6_store = domain.store(&["v6"]);
    let config = RuntimeConfig::new(
        "[::1]:0".parse().unwrap(),
        AccessPolicy::new(record(0, 0, 0o751, &[&echo_service])),
    );
    let v6 = match Runtime::start(config, v6_store.credentials()) {
        Ok(runtime) => runtime,
        Err(BttpError::Bind { reason, .. }) => {
            eprintln!("skipping the IPv6 half: no IPv6 loopback here ({reason})");
            return;
        }
        Err(other) => panic!("{other}"),
    };
    register_echo(&v6, echo_service.clone()).unwrap();
    assert!(v6.local_addr().unwrap().is_ipv6());
    let client_runtime = Runtime::anonymous(RuntimeConfig::anonymous()).unwrap();
    client_runtime.add_peer(
        v6_store.path.clone(),
        v6.local_addr().unwrap(),
        [echo_service.clone()],
    );
    register_echo(&server, echo_service.clone()).unwrap();
    client_runtime.add_peer(
        store.path.clone(),
        server.local_addr().unwrap(),
        [echo_service],
    );
    for path in [&v6_store.path, &store.path] {
        let reply: EchoReply = client_runtime
            .call(echo_name(&domain, path), echo(b"dual"), FIVE_SECONDS)
            .await
            .unwrap();
        assert_eq!(echoed(reply), b"dual");
    }
}

#[tokio::test]
async fn stream_limit_bounds_what_a_peer_has_in_flight() {
    let domain = Domain::new();
    let store = domain.store(&["rt"]);
    let echo_service = domain.echo_service();
    let mut config = RuntimeConfig::new(
        loopback(),
        AccessPolicy::new(record(0, 0, 0o751, &[&echo_service])),
    );
    config.limits.max_streams_per_peer = 4;
    let server = Runtime::start(config, store.credentials()).unwrap();
    let counters = register_echo(&server, echo_service.clone()).unwrap();
    let client_runtime = Runtime::anonymous(RuntimeConfig::anonymous()).unwrap();
    client_runtime.add_peer(
        store.path.clone(),
        server.local_addr().unwrap(),
        [echo_service],
    );
    let to = echo_name(&domain, &store.path);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..32u8 {
        let client_runtime = client_runtime.clone();
        let to = to.clone();
        calls.spawn(async move {
            let request = EchoRequest::Delayed {
                millis: 50,
                payload: ByteBuf::from(vec![i]),
            };
            let reply: EchoReply = client_runtime
                .call(to, request, FIVE_SECONDS)
                .await
                .unwrap();
            assert_eq!(echoed(reply), vec![i]);
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    let stats = counters.snapshot();
    assert_eq!(stats.calls, 32);
    assert!(stats.max_in_flight <= 4, "{stats:?}");
    assert!(stats.max_in_flight >= 2, "{stats:?}");
}

#[tokio::test]
async fn signer_principal_must_match_the_writecap() {
    let domain = Domain::new();
    let (_, credentials) = key_credentials(|principal| {
        let now = Timestamp::now();
        Writecap::issue(
            &*domain.root_signer(),
            None,
            principal,
            domain.path(&["rt"]),
            now.after(Duration::from_secs(60)),
            now,
        )
        .unwrap()
    });
    let other = std::sync::Arc::new(blocktree_core::keys::SigningKeyPair::generate().unwrap());
    let mismatched =
        blocktree_netstack::Credentials::new(other.clone(), credentials.writecap().clone());
    assert!(matches!(mismatched, Err(BttpError::Credentials(_))));
    assert_ne!(Signer::principal(&*other), credentials.principal());
}
