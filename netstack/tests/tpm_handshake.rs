//! bttp with keys that never leave a TPM (feature `tpm`): two runtimes whose
//! credential stores are core's `TpmCredStore`, each on its own swtpm, complete
//! the mutual TLS handshake (certificate and CertificateVerify signed by the
//! TPM) and exchange calls; a TPM that goes away fails the next handshake with an
//! error, not the process.
//!
//! Needs `swtpm` on the PATH (scripts/test installs it).
#![cfg(feature = "tpm")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::BtPath;
use blocktree_core::credstore::CredStore;
use blocktree_core::credstore::tpm::{Tcti, TpmCredStore};
use blocktree_core::provision::{WritecapRequest, approve};
use blocktree_core::time::Timestamp;
use blocktree_netstack::echo::{EchoReply, register_echo};
use blocktree_netstack::{AccessPolicy, Credentials, Runtime, RuntimeConfig};
use common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const FIVE_SECONDS: Duration = Duration::from_secs(5);

#[path = "../../core/tests/swtpm/mod.rs"]
mod swtpm;
use swtpm::Swtpm;

/// A TPM store in `dir` on `tpm`, with a writecap for `components` approved by
/// the domain's root.
fn tpm_store(domain: &Domain, tpm: &Swtpm, dir: &Path, components: &[&str]) -> TpmCredStore {
    let mut store = TpmCredStore::create(dir, &tpm.tcti_text().parse::<Tcti>().unwrap()).unwrap();
    let path = domain.path(components);
    let request = WritecapRequest::new(&store, Some(path)).unwrap();
    let now = Timestamp::now();
    let writecap = approve(
        &request,
        &*domain.root_signer(),
        None,
        None,
        now.after(Duration::from_secs(3600)),
        now,
    )
    .unwrap();
    store.set_writecap(writecap).unwrap();
    store
}

fn path_of(store: &TpmCredStore) -> BtPath {
    store.writecap().unwrap().path().unwrap().clone()
}

#[tokio::test]
async fn runtimes_with_tpm_keys_complete_the_mutual_handshake() {
    let domain = Domain::new();
    let (server_tpm, mut client_tpm) = (Swtpm::start(), Swtpm::start());
    let server_store = tpm_store(
        &domain,
        &server_tpm,
        &domain.dir.path().join("server"),
        &["servers", "tpm"],
    );
    let client_store = tpm_store(
        &domain,
        &client_tpm,
        &domain.dir.path().join("client"),
        &["clients", "tpm"],
    );
    let (server_path, client_path) = (path_of(&server_store), path_of(&client_store));
    let (server_principal, client_principal) = (server_store.principal(), client_store.principal());

    // The server signs through the store itself, the client through the store's
    // owned signer: both ask the TPM.
    let echo_service = domain.echo_service();
    let server_store: Arc<dyn CredStore> = Arc::new(server_store);
    let server = start_runtime(
        Credentials::from_store(server_store).unwrap(),
        0o750,
        &[&echo_service],
    );
    let mut server_access = AccessPolicy::new(record(0, 0, 0o750, &[&echo_service]));
    server_access
        .principals
        .insert(client_principal, attrs(0, 0));
    server.set_access(server_access);
    register_echo(&server, echo_service.clone()).unwrap();

    let client_writecap = client_store.writecap().unwrap().clone();
    let client_credentials =
        Credentials::new(Arc::new(client_store.signer()), client_writecap).unwrap();
    let client = Runtime::start(
        RuntimeConfig::new(
            loopback(),
            AccessPolicy::new(record(0, 0, 0o750, &[]))
                .with_principal(server_principal, attrs(5, 0)),
        ),
        client_credentials,
    )
    .unwrap();
    client.add_peer(
        server_path.clone(),
        server.local_addr().unwrap(),
        [echo_service.clone()],
    );
    let to = echo_name(&domain, &server_path);
    for round in 0..5u8 {
        let reply: EchoReply = client
            .call(to.clone(), echo(&[round; 4]), FIVE_SECONDS)
            .await
            .unwrap();
        assert_eq!(echoed(reply), vec![round; 4]);
    }
    assert_eq!(client.open_connections(), 1);

    // The server knows the client by the path its TPM-signed certificate proved.
    let mut server_actor = server.register_actor().unwrap();
    let client_actor = client.register_actor().unwrap();
    client
        .send_from(client_actor.name(), server_actor.name().clone(), 7u32)
        .await
        .unwrap();
    let envelope = server_actor.recv().await.unwrap();
    assert_eq!(envelope.peer().path(), Some(&client_path));

    // Without its TPM the client cannot sign a new handshake: a call to another
    // server fails with an error, and the connection it has goes on working.
    let other_store = domain.store(&["others", "file"]);
    let other = start_runtime(other_store.credentials(), 0o750, &[&echo_service]);
    let mut other_access = AccessPolicy::new(record(0, 0, 0o750, &[&echo_service]));
    other_access
        .principals
        .insert(client_principal, attrs(0, 0));
    other.set_access(other_access);
    register_echo(&other, echo_service.clone()).unwrap();
    client.add_peer(
        other_store.path.clone(),
        other.local_addr().unwrap(),
        [echo_service.clone()],
    );
    client_tpm.stop();
    let refused: Result<EchoReply, _> = client
        .call(
            echo_name(&domain, &other_store.path),
            echo(b"no TPM"),
            FIVE_SECONDS,
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let reply: EchoReply = client
        .call(to.clone(), echo(b"still here"), FIVE_SECONDS)
        .await
        .unwrap();
    assert_eq!(echoed(reply), b"still here");
    client.shutdown().await;
    other.shutdown().await;
    server.shutdown().await;
}
