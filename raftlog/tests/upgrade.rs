//! Members in one process: a pre-Raft store upgraded in place, a local
//! cluster that later gets a network (its address recorded, a member joins
//! by address), and what linearizable reads cost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::credstore::FileCredStore;
use blocktree_netstack::Credentials;
use blocktree_raftlog::service::SectorService;
use blocktree_raftlog::{DirectService, GenerationInfo, RaftConfig, RaftService};
use common::Domain;
use common::files::one_sector_file;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn reads(service: &dyn SectorService, inode: u64) -> Vec<u8> {
    service.read_data(inode, &[0], None).unwrap()[0]
        .clone()
        .unwrap()
}

fn credentials(domain: &Domain, name: &str) -> Credentials {
    let (dir, _) = domain.store(&["cluster", name]);
    Credentials::from_store(Arc::new(FileCredStore::open(&dir).unwrap())).unwrap()
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Waits until `members` applied the same index; returns their digests.
fn converged(members: &[&RaftService]) -> Vec<(String, u64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let applied: Vec<_> = members.iter().map(|m| m.status().applied_index).collect();
        if applied.iter().all(|index| *index == applied[0]) {
            let digests: Vec<_> = members
                .iter()
                .map(|m| m.content_digest().unwrap())
                .collect();
            let after: Vec<_> = members.iter().map(|m| m.status().applied_index).collect();
            if after == applied {
                return digests;
            }
        }
        assert!(Instant::now() < deadline, "no convergence: {applied:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_direct_store_is_upgraded_in_place_and_never_reuses_an_inode() {
    let domain = Domain::new();
    let (writer_dir, _) = domain.store(&["cluster"]);
    let writer = FileCredStore::open(&writer_dir).unwrap();
    let dir = domain.dir.path().join("direct");
    let info = GenerationInfo {
        generation: 4,
        directory: domain.directory(),
    };
    let direct =
        DirectService::create(&dir, info.clone(), blocktree_engine::EngineConfig::new).unwrap();
    let old: Vec<(u64, u8)> = (0..5u8)
        .map(|fill| (one_sector_file(&direct, &writer, &[fill; 4096]), fill))
        .collect();
    drop(direct);

    let service = RaftService::open_or_create(RaftConfig::new(&dir), || {
        panic!("the pre-Raft store was not recognised")
    })
    .unwrap();
    assert!(RaftService::exists(&dir));
    for (inode, fill) in &old {
        assert_eq!(reads(&service, *inode), vec![*fill; 4096], "inode {inode}");
    }
    let fresh = one_sector_file(&service, &writer, &[0xee; 4096]);
    assert!(
        old.iter().all(|(inode, _)| fresh > *inode),
        "{fresh} reuses a number DirectService handed out ({old:?})"
    );
    assert_eq!(service.content_digest().unwrap().1, 6);
    drop(service);

    // Reopened, it is an ordinary member.
    let service = RaftService::open_or_create(RaftConfig::new(&dir), || unreachable!()).unwrap();
    assert_eq!(reads(&service, fresh), vec![0xee; 4096]);
    let again = one_sector_file(&service, &writer, &[1; 512]);
    assert!(again > fresh);
}

#[test]
fn a_local_cluster_gets_a_network_records_its_address_and_takes_a_member() {
    let domain = Domain::new();
    let (writer_dir, _) = domain.store(&["cluster"]);
    let writer = FileCredStore::open(&writer_dir).unwrap();
    let dir = domain.dir.path().join("first");
    let info = GenerationInfo {
        generation: 5,
        directory: domain.directory(),
    };
    let local = RaftService::open_or_create(RaftConfig::new(&dir), || Ok(info.clone())).unwrap();
    let early = one_sector_file(&local, &writer, &[3; 4096]);
    assert_eq!(local.status().voters[0].1.addr, "");
    drop(local);

    // `blocktree up --listen`: the same data, now networked.
    let n1 = credentials(&domain, "n1");
    let config = RaftConfig::new(&dir).networked(n1.clone(), loopback());
    let first = RaftService::open(config).unwrap();
    let addr = first.local_addr().unwrap();
    let recorded = first.status().voters[0].1.clone();
    assert_eq!(recorded.addr, addr.to_string());
    assert!(recorded.path.is_some());

    // A second member joins knowing only the address, and catches up.
    let n2 = credentials(&domain, "n2");
    let config =
        RaftConfig::new(domain.dir.path().join("second")).networked(n2.clone(), loopback());
    let second = RaftService::join_address(config, addr).unwrap();
    assert_eq!(second.status().voters.len(), 2);
    assert_eq!(reads(&second, early), vec![3; 4096]);
    // Writes through the follower are forwarded, and both converge.
    let later = one_sector_file(&second, &writer, &[4; 4096]);
    assert_eq!(reads(&first, later), vec![4; 4096]);
    let digests = converged(&[&first, &second]);
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0].1, 2);
    // A client that knows only the address learns the cluster's state.
    let status = blocktree_raftlog::query_status_at(&credentials(&domain, "client"), addr).unwrap();
    assert_eq!(status.voters.len(), 2);
    assert_eq!(status.generation, 5);

    // Restarted on other ports, one after the other, while the other runs:
    // each records its new address (as leader, or through the leader, found
    // by asking the other member).
    drop(first);
    let config = RaftConfig::new(&dir).networked(n1, loopback());
    let first = RaftService::open(config).unwrap();
    let moved = |first: &RaftService, second: &RaftService| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let current = [first, second].iter().all(|member| {
                let me = member.node_id();
                let listening = member.local_addr().unwrap().to_string();
                [first, second].iter().all(|viewer| {
                    viewer
                        .status()
                        .voters
                        .iter()
                        .any(|(id, node)| *id == me && node.addr == listening)
                })
            });
            if current {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "addresses not updated (listening at {:?} / {:?}; leaders {:?} / {:?}): {:?} / {:?}",
                first.local_addr(),
                second.local_addr(),
                first.status().leader,
                second.status().leader,
                first.status().voters,
                second.status().voters
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    moved(&first, &second);
    drop(second);
    let config = RaftConfig::new(domain.dir.path().join("second")).networked(n2, loopback());
    let second = RaftService::open(config).unwrap();
    moved(&first, &second);
    assert_eq!(reads(&second, later), vec![4; 4096]);
}

#[test]
fn linearizable_reads_cost_no_round_alone_and_share_rounds_in_a_cluster() {
    let domain = Domain::new();
    let (writer_dir, _) = domain.store(&["cluster"]);
    let writer = FileCredStore::open(&writer_dir).unwrap();
    let info = GenerationInfo {
        generation: 6,
        directory: domain.directory(),
    };
    // One member: no read-index round at all.
    let solo = RaftService::open_or_create(RaftConfig::new(domain.dir.path().join("solo")), || {
        Ok(info.clone())
    })
    .unwrap();
    let inode = one_sector_file(&solo, &writer, &[5; 4096]);
    for _ in 0..500 {
        assert_eq!(reads(&solo, inode), vec![5; 4096]);
    }
    assert_eq!(solo.read_index_rounds(), 0);
    drop(solo);

    // Three members: the leader's reads within a lease share one round; a
    // follower's linearizable reads see a write made on the leader at once.
    let first = RaftService::create(
        RaftConfig::new(domain.dir.path().join("m1"))
            .networked(credentials(&domain, "m1"), loopback()),
        info.clone(),
    )
    .unwrap();
    first.wait_for_leader(Duration::from_secs(10)).unwrap();
    let addr = first.local_addr().unwrap();
    let others: Vec<RaftService> = ["m2", "m3"]
        .iter()
        .map(|name| {
            let config = RaftConfig::new(domain.dir.path().join(name))
                .networked(credentials(&domain, name), loopback());
            RaftService::join_address(config, addr).unwrap()
        })
        .collect();
    let inode = one_sector_file(&first, &writer, &[6; 4096]);
    let before = first.read_index_rounds();
    let started = Instant::now();
    let mut count = 0u64;
    while count < 300 {
        assert_eq!(reads(&first, inode), vec![6; 4096]);
        count += 1;
    }
    let rounds = first.read_index_rounds() - before;
    // A lease lasts 75 ms: at most one round per lease (plus the first).
    let bound = started.elapsed().as_millis() as u64 / 75 + 2;
    assert!(
        rounds <= bound && rounds < count,
        "{rounds} rounds for {count} reads in {:?}",
        started.elapsed()
    );
    // Concurrent readers on the leader and on both followers.
    std::thread::scope(|scope| {
        for service in std::iter::once(&first).chain(&others) {
            for _ in 0..3 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        assert_eq!(reads(service, inode), vec![6; 4096]);
                    }
                });
            }
        }
    });
    for round in 0..20u8 {
        let written = one_sector_file(&first, &writer, &[round; 512]);
        for follower in &others {
            assert_eq!(reads(follower, written), vec![round; 512]);
        }
    }
}
