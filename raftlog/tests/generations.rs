//! Generation numbers: the cluster of a domain's root directory hands them
//! out to new directories' clusters, through its log (members in one
//! process, talking bttp on 127.0.0.1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::credstore::FileCredStore;
use blocktree_netstack::Credentials;
use blocktree_raftlog::{
    GenerationInfo, ROOT_GENERATION, RaftConfig, RaftService, request_generation,
};
use common::Domain;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

fn credentials(domain: &Domain, components: &[&str]) -> Credentials {
    let (dir, _) = domain.store(components);
    Credentials::from_store(Arc::new(FileCredStore::open(&dir).unwrap())).unwrap()
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn member(domain: &Domain, name: &str, components: &[&str]) -> RaftConfig {
    RaftConfig::new(domain.dir.path().join(name))
        .networked(credentials(domain, components), loopback())
}

#[test]
fn the_root_cluster_numbers_new_generations_once_each_on_any_member() {
    let domain = Domain::new();
    let root = domain.path(&[]);
    let whole = credentials(&domain, &[]);
    let first = RaftService::create(
        RaftConfig::new(domain.dir.path().join("r1")).networked(whole.clone(), loopback()),
        GenerationInfo {
            generation: ROOT_GENERATION,
            directory: root.clone(),
        },
    )
    .unwrap();
    first.wait_for_leader(Duration::from_secs(10)).unwrap();
    let first_addr = first.local_addr().unwrap();
    let second =
        RaftService::join_address(member(&domain, "r2", &["servers", "r2"]), first_addr).unwrap();
    let second_addr = second.local_addr().unwrap();

    // A server of /<root>/photos asks a follower, which forwards to the
    // leader; then the leader itself, for another directory.
    let photos = credentials(&domain, &["photos"]);
    assert_eq!(request_generation(&photos, second_addr).unwrap(), 2);
    let music = credentials(&domain, &["music"]);
    assert_eq!(request_generation(&music, first_addr).unwrap(), 3);
    // Asking again is a new number (a store that never got to record its
    // number wastes one; none is handed out twice).
    assert_eq!(request_generation(&photos, first_addr).unwrap(), 4);

    // The root's own directory has its number already.
    let error = request_generation(&whole, first_addr).unwrap_err();
    assert!(
        error.to_string().contains("is the domain's root directory"),
        "{error}"
    );

    // The count is replicated: a member that joins later and then leads
    // goes on from it.
    let third =
        RaftService::join_address(member(&domain, "r3", &["servers", "r3"]), first_addr).unwrap();
    drop(first);
    third.wait_for_leader(Duration::from_secs(10)).unwrap();
    let video = credentials(&domain, &["video"]);
    let third_addr = third.local_addr().unwrap();
    assert_eq!(request_generation(&video, third_addr).unwrap(), 5);
    drop(second);
    drop(third);
}

#[test]
fn only_the_root_directory_cluster_numbers_generations() {
    let domain = Domain::new();
    let photos = RaftService::create(
        member(&domain, "p1", &["photos"]),
        GenerationInfo {
            generation: 2,
            directory: domain.path(&["photos"]),
        },
    )
    .unwrap();
    photos.wait_for_leader(Duration::from_secs(10)).unwrap();
    let below = credentials(&domain, &["photos", "raw"]);
    let error = request_generation(&below, photos.local_addr().unwrap()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("only the cluster of the domain's root directory numbers generations"),
        "{error}"
    );
}
