//! The seeds of the bttp fuzz targets (`fuzz/seeds/bttp_*`) are valid inputs,
//! so the fuzzer starts from frames and certificates that get past the first
//! checks. `BTTP_WRITE_FUZZ_SEEDS=1` rewrites them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use blocktree_core::keys::{Signer, SigningKeyPair};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::Writecap;
use blocktree_core::{BtPath, PrincipalId};
use blocktree_netstack::cert::{build_certificate, parse_certificate};
use blocktree_netstack::frame::{self, ErrorCode, Frame, FrameKind, RemoteError, RequestHeader};
use blocktree_netstack::{ActorName, Name, ServiceId, ServiceName};
use bytes::Bytes;
use std::fs;
use std::path::PathBuf;

const MAX: usize = 1 << 20;

fn seeds(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
}

fn runtime() -> BtPath {
    BtPath::root_of(PrincipalId::from_bytes([42; 32]))
        .join("servers")
        .unwrap()
        .join("a")
        .unwrap()
}

fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let actor = Name::Actor(ActorName::new(runtime(), uuid::Uuid::from_u128(7)));
    let service = Name::Service(ServiceName {
        service: runtime().join("echo").unwrap(),
        scope: runtime().parent().unwrap(),
        rootward: true,
        id: ServiceId::name("echo").unwrap(),
    });
    let request = |kind, from, to: &Name, payload: &[u8]| {
        let header = RequestHeader {
            from,
            to: to.clone(),
        };
        frame::encode_request(kind, &header, payload, MAX).unwrap()
    };
    vec![
        (
            "send-actor",
            request(FrameKind::Send, None, &actor, b"hello"),
        ),
        (
            "call-service",
            request(
                FrameKind::Call,
                Some(uuid::Uuid::from_u128(9)),
                &service,
                &[0u8; 64],
            ),
        ),
        (
            "reply",
            frame::encode_reply(&b"reply".to_vec(), MAX).unwrap(),
        ),
        (
            "error",
            frame::encode_error(&RemoteError::new(ErrorCode::NotAuthorized, "no")),
        ),
    ]
}

fn certificate() -> Vec<u8> {
    let root = SigningKeyPair::generate().unwrap();
    let key = SigningKeyPair::generate().unwrap();
    let path = BtPath::root_of(Signer::principal(&root))
        .join("rt")
        .unwrap();
    // Valid at the fuzz targets' fixed clock, 2025-06-15, until 2096.
    let writecap = Writecap::issue(
        &root,
        None,
        Signer::principal(&key),
        path,
        Timestamp(4_000_000_000),
        Timestamp(1_750_000_000),
    )
    .unwrap();
    build_certificate(&key, &writecap).unwrap().to_vec()
}

fn files(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(seeds(target))
        .unwrap_or_else(|error| panic!("fuzz/seeds/{target}: {error}"))
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                fs::read(entry.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn fuzz_seeds_are_valid() {
    if std::env::var_os("BTTP_WRITE_FUZZ_SEEDS").is_some() {
        fs::create_dir_all(seeds("bttp_frame")).unwrap();
        for (name, bytes) in frames() {
            fs::write(seeds("bttp_frame").join(name), bytes).unwrap();
        }
        fs::create_dir_all(seeds("bttp_cert")).unwrap();
        fs::write(seeds("bttp_cert").join("certificate"), certificate()).unwrap();
    }
    let frame_seeds = files("bttp_frame");
    assert_eq!(frame_seeds.len(), frames().len());
    for (name, bytes) in frame_seeds {
        let decoded = frame::decode(&bytes, MAX).unwrap_or_else(|error| panic!("{name}: {error}"));
        if let Frame::Call { payload, .. } = &decoded {
            assert_eq!(
                payload,
                &Bytes::from(postcard::to_allocvec(&[0u8; 64][..]).unwrap())
            );
        }
    }
    let cert_seeds = files("bttp_cert");
    assert!(!cert_seeds.is_empty());
    for (name, bytes) in cert_seeds {
        parse_certificate(&bytes).unwrap_or_else(|error| panic!("{name}: {error}"));
    }
}
