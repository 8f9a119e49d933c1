//! Shared by the integration tests: a domain with file credential stores, and
//! `bttp-node` processes on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use blocktree_core::credstore::{CredStore, FileCredStore};
use blocktree_core::keys::{Signer, SigningKeyPair};
use blocktree_core::writecap::Writecap;
use blocktree_core::{BtPath, PrincipalId};
use blocktree_netstack::echo::{EchoReply, EchoRequest};
use blocktree_netstack::{
    AccessPolicy, AuthzAttrs, Credentials, Runtime, RuntimeConfig, RuntimeRecord, ServiceId,
    ServiceName,
};
use serde_bytes::ByteBuf;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod domain;
pub use domain::Domain;

impl Domain {
    /// A runtime store at `components` with a writecap approved by the root.
    pub fn store(&self, components: &[&str]) -> RuntimeStore {
        let dir = self.dir.path().join(components.join("_"));
        let (principal, path) = self.approved_store(&dir, components);
        RuntimeStore {
            principal,
            dir,
            path,
        }
    }

    /// The service path of the echo service in this domain.
    pub fn echo_service(&self) -> BtPath {
        self.path(&["services", "echo"])
    }
}

pub struct RuntimeStore {
    pub dir: PathBuf,
    pub path: BtPath,
    pub principal: PrincipalId,
}

impl RuntimeStore {
    pub fn credentials(&self) -> Credentials {
        let store: Arc<dyn CredStore> = Arc::new(FileCredStore::open(&self.dir).unwrap());
        Credentials::from_store(store).unwrap()
    }
}

/// In-memory credentials: a fresh key and `writecap` built for it by `make`.
pub fn key_credentials(
    make: impl FnOnce(PrincipalId) -> Writecap,
) -> (Arc<SigningKeyPair>, Credentials) {
    let key = Arc::new(SigningKeyPair::generate().unwrap());
    let writecap = make(Signer::principal(&*key));
    let credentials = Credentials::new(key.clone(), writecap).unwrap();
    (key, credentials)
}

pub fn record(uid: u32, gid: u32, mode: u32, services: &[&BtPath]) -> RuntimeRecord {
    RuntimeRecord {
        uid,
        gid,
        mode,
        services: services.iter().map(|service| (*service).clone()).collect(),
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A runtime on 127.0.0.1 whose file (uid 0, gid 0) has `mode`.
pub fn start_runtime(credentials: Credentials, mode: u32, services: &[&BtPath]) -> Runtime {
    let config = RuntimeConfig::new(loopback(), AccessPolicy::new(record(0, 0, mode, services)));
    Runtime::start(config, credentials).unwrap()
}

/// A client runtime that serves nothing and lets nobody message it.
pub fn client(credentials: Credentials) -> Runtime {
    start_runtime(credentials, 0o700, &[])
}

pub fn echo_name(domain: &Domain, server: &BtPath) -> ServiceName {
    ServiceName {
        service: domain.echo_service(),
        scope: server.parent().unwrap(),
        rootward: false,
        id: ServiceId::name("echo").unwrap(),
    }
}

pub fn echo(text: &[u8]) -> EchoRequest {
    EchoRequest::Echo(ByteBuf::from(text.to_vec()))
}

pub fn echoed(reply: EchoReply) -> Vec<u8> {
    match reply {
        EchoReply::Echo(bytes) => bytes.into_vec(),
        other => panic!("expected an echo, got {other:?}"),
    }
}

/// A `bttp-node serve` process; killed when dropped.
pub struct Node {
    child: Child,
    stdin: Option<ChildStdin>,
    pub addr: SocketAddr,
    pub path: BtPath,
    stderr: Arc<Mutex<Vec<String>>>,
}

pub const NODE: &str = env!("CARGO_BIN_EXE_bttp-node");

impl Node {
    /// Starts `bttp-node serve --store <store> --service <echo> <extra...>`.
    pub fn serve(domain: &Domain, store: &RuntimeStore, extra: &[String]) -> Node {
        let mut child = Command::new(NODE)
            .arg("serve")
            .arg("--store")
            .arg(&store.dir)
            .arg("--service")
            .arg(domain.echo_service().to_string())
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let mut words = line.split_whitespace();
        assert_eq!(
            words.next(),
            Some("ready"),
            "bttp-node did not start: {line:?}, stderr: {:?}",
            stderr.lock().unwrap()
        );
        let addr = words.next().unwrap().parse().unwrap();
        let path = words.next().unwrap().parse().unwrap();
        Node {
            stdin: child.stdin.take(),
            child,
            addr,
            path,
            stderr,
        }
    }

    /// Everything the node logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits up to a few seconds for the node to log a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) -> String {
        for _ in 0..100 {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        panic!(
            "bttp-node never logged {needle:?}; it logged:\n{}",
            self.stderr()
        );
    }

    /// Kills the process at once (SIGKILL): no goodbye to its peers.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.stdin.take());
        self.kill();
    }
}

/// `bttp-node call ...`: its exit status, standard output and standard error.
pub fn node_call(args: &[String]) -> (bool, String, String) {
    let output = Command::new(NODE).arg("call").args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn attrs_arg(principal: PrincipalId, uid: u32, gid: u32) -> Vec<String> {
    vec!["--attrs".into(), format!("{principal}={uid}:{gid}")]
}

pub fn attrs(uid: u32, gid: u32) -> AuthzAttrs {
    AuthzAttrs::new(uid, gid)
}
