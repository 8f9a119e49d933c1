//! `bttp-node` processes on 127.0.0.1: authentication and its refusals,
//! anonymous clients, timeouts, a killed peer, reconnection, and 10,000
//! concurrent calls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::keys::{Signature, Signer, SigningKeyPair};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{Certificate, Writecap};
use blocktree_netstack::echo::{EchoReply, EchoRequest};
use blocktree_netstack::{BttpError, Credentials, Refusal, Runtime, RuntimeConfig, ServiceName};
use common::*;
use serde_bytes::ByteBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const FIVE_SECONDS: Duration = Duration::from_secs(5);
const HOUR: Duration = Duration::from_secs(3600);

fn client_for(node: &Node, domain: &Domain, credentials: Credentials) -> Runtime {
    let runtime = client(credentials);
    runtime.add_peer(node.path.clone(), node.addr, [domain.echo_service()]);
    runtime
}

fn anonymous_for(node: &Node, domain: &Domain) -> Runtime {
    let runtime = Runtime::anonymous(RuntimeConfig::anonymous()).unwrap();
    runtime.add_peer(node.path.clone(), node.addr, [domain.echo_service()]);
    runtime
}

async fn ping(runtime: &Runtime, domain: &Domain, node: &Node) -> Result<Vec<u8>, BttpError> {
    runtime
        .call::<_, EchoReply>(echo_name(domain, &node.path), echo(b"ping"), FIVE_SECONDS)
        .await
        .map(echoed)
}

fn call_args(node: &Node, domain: &Domain, who: &[String]) -> Vec<String> {
    let mut args = who.to_vec();
    args.extend([
        "--peer".into(),
        node.addr.to_string(),
        "--runtime".into(),
        node.path.to_string(),
        "--service".into(),
        domain.echo_service().to_string(),
    ]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_of_one_domain_authenticate_each_other() {
    let domain = Domain::new();
    let server = domain.store(&["servers", "a"]);
    let member = domain.store(&["clients", "b"]);
    // The client is in the runtime file's group; mode 750 lets the group execute.
    let node = Node::serve(
        &domain,
        &server,
        &[
            vec![
                "--owner".into(),
                "10:20".into(),
                "--mode".into(),
                "750".into(),
            ],
            vec!["--attrs".into(), format!("{}=30:40,20", member.principal)],
        ]
        .concat(),
    );
    let runtime = client_for(&node, &domain, member.credentials());
    assert_eq!(ping(&runtime, &domain, &node).await.unwrap(), b"ping");

    // Process to process: `bttp-node call` with the member's store.
    let (ok, stdout, stderr) = node_call(&call_args(
        &node,
        &domain,
        &["--store".into(), member.dir.display().to_string()],
    ));
    assert!(ok, "bttp-node call failed: {stderr}");
    assert_eq!(stdout.trim(), "reply ping");
    assert!(!node.stderr().contains("refused"), "{}", node.stderr());
}

/// Every way a client's writecap can be wrong is refused at the handshake,
/// each with its own reason at both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_writecaps_are_refused_at_the_handshake() {
    let domain = Domain::new();
    let server = domain.store(&["servers", "a"]);
    let revoked = domain.store(&["clients", "revoked"]);
    let node = Node::serve(
        &domain,
        &server,
        &[
            "--mode".into(),
            "751".into(),
            "--revoke".into(),
            revoked.principal.to_string(),
        ],
    );
    let now = Timestamp::now();
    let root = domain.root_signer();
    let issue = |principal, path, expires| {
        Writecap::issue(&*root, None, principal, path, expires, now).unwrap()
    };

    let other_domain = Domain::new();
    let foreign = other_domain.store(&["clients", "x"]).credentials();

    let (_, expired) = key_credentials(|principal| {
        issue(
            principal,
            domain.path(&["clients", "old"]),
            Timestamp(now.0 - 1),
        )
    });

    // The root delegates /clients/a to a middleman, who grants /clients/b: a
    // path outside its own.
    let middleman = SigningKeyPair::generate().unwrap();
    let middle = issue(
        Signer::principal(&middleman),
        domain.path(&["clients", "a"]),
        now.after(HOUR),
    );
    let (_, not_nested) = key_credentials(|principal| {
        let grant = Certificate::sign(
            &middleman,
            principal,
            domain.path(&["clients", "b"]),
            now.after(HOUR),
        )
        .unwrap();
        let mut chain = vec![grant];
        chain.extend(middle.chain().iter().cloned());
        Writecap::from_chain(chain)
    });

    let (_, forged) = key_credentials(|principal| {
        let genuine = issue(principal, domain.path(&["clients", "f"]), now.after(HOUR));
        let mut chain = genuine.chain().to_vec();
        let mut signature = *chain[0].signature.as_bytes();
        signature[5] ^= 0x40;
        chain[0].signature = Signature::from_bytes(signature);
        Writecap::from_chain(chain)
    });

    let cases = [
        (
            "another root",
            foreign,
            Refusal::UntrustedRoot,
            "which this runtime does not trust",
        ),
        ("expired", expired, Refusal::Expired, "expired at"),
        (
            "paths not nested",
            not_nested,
            Refusal::InvalidWritecap,
            "which is not inside",
        ),
        (
            "forged signature",
            forged,
            Refusal::BadSignature,
            "has an invalid signature",
        ),
        (
            "revoked",
            revoked.credentials(),
            Refusal::Revoked,
            "is revoked",
        ),
    ];
    for (what, credentials, refusal, logged) in cases {
        let runtime = client_for(&node, &domain, credentials);
        match ping(&runtime, &domain, &node).await {
            Err(BttpError::Refused { refusal: got, .. }) => {
                assert_eq!(got, refusal, "{what}")
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        let log = node.wait_for_log(logged);
        assert!(
            log.contains("refused a client certificate"),
            "{what}: {log}"
        );
        runtime.shutdown().await;
    }
    // The node still serves a good client.
    let good = client_for(
        &node,
        &domain,
        domain.store(&["clients", "good"]).credentials(),
    );
    assert_eq!(ping(&good, &domain, &node).await.unwrap(), b"ping");
}

/// A principal id is base64url, so one in 64 starts with '-': options taking
/// one must not read it as a flag (this test failed at random in CI before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principal_ids_starting_with_a_hyphen_are_option_values() {
    let domain = Domain::new();
    let server = domain.store(&["servers", "hyphen"]);
    let hyphenated = format!("-{}", "A".repeat(42));
    assert!(hyphenated.parse::<blocktree_core::PrincipalId>().is_ok());
    let node = Node::serve(
        &domain,
        &server,
        &[
            "--mode".into(),
            "751".into(),
            "--revoke".into(),
            hyphenated.clone(),
            "--trust".into(),
            hyphenated.clone(),
            "--attrs".into(),
            format!("{hyphenated}=30:40"),
        ],
    );
    let member = domain.store(&["clients", "member"]);
    let reply = ping(
        &client_for(&node, &domain, member.credentials()),
        &domain,
        &node,
    )
    .await;
    assert!(reply.is_ok(), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_only_where_others_may_execute() {
    let domain = Domain::new();
    let closed_store = domain.store(&["servers", "closed"]);
    let open_store = domain.store(&["servers", "open"]);
    let closed = Node::serve(&domain, &closed_store, &["--mode".into(), "750".into()]);
    let open = Node::serve(&domain, &open_store, &["--mode".into(), "751".into()]);

    let refused = ping(&anonymous_for(&closed, &domain), &domain, &closed).await;
    assert!(
        matches!(
            refused,
            Err(BttpError::Refused {
                refusal: Refusal::CredentialsRequired,
                ..
            })
        ),
        "{refused:?}"
    );
    let (ok, _, stderr) = node_call(&call_args(&closed, &domain, &["--anonymous".into()]));
    assert!(!ok);
    assert!(
        stderr.contains("does not admit anonymous clients"),
        "{stderr}"
    );

    assert_eq!(
        ping(&anonymous_for(&open, &domain), &domain, &open)
            .await
            .unwrap(),
        b"ping"
    );
    let (ok, stdout, stderr) = node_call(&call_args(&open, &domain, &["--anonymous".into()]));
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "reply ping");

    // A member of the domain without execute permission connects, but its
    // calls are refused.
    let stranger = domain.store(&["clients", "stranger"]);
    let result = ping(
        &client_for(&closed, &domain, stranger.credentials()),
        &domain,
        &closed,
    )
    .await;
    assert!(
        matches!(&result, Err(BttpError::Rejected { error, .. }) if error.detail.contains("execute permission")),
        "{result:?}"
    );
}

fn delayed(millis: u64) -> EchoRequest {
    EchoRequest::Delayed {
        millis,
        payload: ByteBuf::from(b"late".to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_time_out_and_the_connection_carries_on() {
    let domain = Domain::new();
    let server = domain.store(&["servers", "a"]);
    let node = Node::serve(&domain, &server, &["--mode".into(), "751".into()]);
    let runtime = anonymous_for(&node, &domain);
    assert_eq!(ping(&runtime, &domain, &node).await.unwrap(), b"ping");
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let late: Result<EchoReply, _> = runtime
        .call(echo_name(&domain, &node.path), delayed(5000), timeout)
        .await;
    let elapsed = started.elapsed();
    assert!(
        matches!(late, Err(BttpError::Timeout(t)) if t == timeout),
        "{late:?}"
    );
    assert!(
        elapsed >= timeout && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(ping(&runtime, &domain, &node).await.unwrap(), b"ping");
    assert_eq!(runtime.open_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_call_fails_the_call_before_its_timeout() {
    let domain = Domain::new();
    let server = domain.store(&["servers", "a"]);
    let mut node = Node::serve(
        &domain,
        &server,
        &[
            "--mode".into(),
            "751".into(),
            "--idle-timeout-ms".into(),
            "1000".into(),
        ],
    );
    let runtime = anonymous_for(&node, &domain);
    let to = echo_name(&domain, &node.path);
    assert_eq!(ping(&runtime, &domain, &node).await.unwrap(), b"ping");
    let timeout = Duration::from_secs(20);
    let pending = {
        let runtime = runtime.clone();
        let to = to.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result: Result<EchoReply, _> = runtime.call(to, delayed(30_000), timeout).await;
            (result, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.kill();
    let (result, elapsed) = pending.await.unwrap();
    assert!(
        matches!(&result, Err(BttpError::ConnectionLost { reason, .. }) if reason.contains("idle timeout")),
        "{result:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reconnected() {
    let domain = Domain::new();
    let server = domain.store(&["servers", "a"]);
    let options = |listen: &str| -> Vec<String> {
        [
            "--mode",
            "751",
            "--idle-timeout-ms",
            "1000",
            "--listen",
            listen,
        ]
        .map(String::from)
        .to_vec()
    };
    let mut node = Node::serve(&domain, &server, &options("127.0.0.1:0"));
    let addr = node.addr;
    let mut config = RuntimeConfig::anonymous();
    config.limits.handshake_timeout = Duration::from_millis(500);
    config.limits.backoff_initial = Duration::from_millis(50);
    config.limits.backoff_max = Duration::from_millis(200);
    let runtime = Runtime::anonymous(config).unwrap();
    runtime.add_peer(node.path.clone(), addr, [domain.echo_service()]);
    assert_eq!(ping(&runtime, &domain, &node).await.unwrap(), b"ping");

    // Killed without a goodbye and started again on the same port: the first
    // call finds the old connection dead within the idle timeout, a later one
    // reconnects.
    node.kill();
    let node = Node::serve(&domain, &server, &options(&addr.to_string()));
    let started = Instant::now();
    let mut failures = Vec::new();
    loop {
        match ping(&runtime, &domain, &node).await {
            Ok(reply) => {
                assert_eq!(reply, b"ping");
                break;
            }
            Err(error) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "never reconnected: {error}"
                );
                failures.push(error);
            }
        }
    }
    assert!(
        matches!(failures.first(), Some(BttpError::ConnectionLost { .. })),
        "{failures:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_calls_all_complete() {
    let domain = Domain::new();
    let server = domain.store(&["servers", "a"]);
    let member = domain.store(&["clients", "b"]);
    let node = Node::serve(
        &domain,
        &server,
        &[
            vec!["--mode".into(), "710".into()],
            attrs_arg(member.principal, 1, 0),
        ]
        .concat(),
    );
    let runtime = Arc::new(client_for(&node, &domain, member.credentials()));
    let to: ServiceName = echo_name(&domain, &node.path);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..10_000u32 {
        let runtime = runtime.clone();
        let to = to.clone();
        calls.spawn(async move {
            let payload = i.to_le_bytes().to_vec();
            let reply: EchoReply = runtime
                .call(to, echo(&payload), Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(echoed(reply), payload);
        });
    }
    let mut completed = 0;
    while let Some(done) = calls.join_next().await {
        done.unwrap();
        completed += 1;
    }
    assert_eq!(completed, 10_000);
    let stats: EchoReply = runtime
        .call(to, EchoRequest::Stats, FIVE_SECONDS)
        .await
        .unwrap();
    match stats {
        // The echo calls and this one.
        EchoReply::Stats(stats) => assert_eq!(stats.calls, 10_001),
        other => panic!("{other:?}"),
    }
    assert_eq!(runtime.open_connections(), 1);
}
