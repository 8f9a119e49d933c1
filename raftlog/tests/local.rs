//! A one-member cluster without network, as the filesystem's local store will
//! open it: every write goes through Raft, and it survives a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::credstore::FileCredStore;
use blocktree_raftlog::service::SectorService;
use blocktree_raftlog::{GenerationInfo, RaftConfig, RaftService};
use common::Domain;
use common::files::one_sector_file;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A domain, a writer holding a writecap over its generation directory, the
/// member's directory and the generation it creates there.
fn setup() -> (Domain, FileCredStore, PathBuf, GenerationInfo) {
    let domain = Domain::new();
    let (writer_dir, _) = domain.store(&["cluster"]);
    let writer = FileCredStore::open(&writer_dir).unwrap();
    let dir = domain.dir.path().join("local");
    let info = GenerationInfo {
        generation: 1,
        directory: domain.directory(),
    };
    (domain, writer, dir, info)
}

#[test]
fn a_local_one_member_cluster_writes_through_raft_and_reopens() {
    let (_domain, writer, dir, info) = setup();
    let service = RaftService::open_or_create(RaftConfig::new(&dir), || Ok(info.clone())).unwrap();
    let notes = service.subscribe(3);
    let inode = one_sector_file(&service, &writer, &[7; 4096]);
    assert_eq!(inode, 3);
    assert!(notes.try_recv().is_ok(), "no write notification");
    assert_eq!(
        service.read_data(inode, &[0], None).unwrap(),
        vec![Some(vec![7; 4096])]
    );
    let status = service.status();
    assert_eq!(status.voters.len(), 1);
    assert_eq!(status.leader, Some(service.node_id()));
    let digest = service.content_digest().unwrap();
    drop(service);

    let service = RaftService::open_or_create(RaftConfig::new(&dir), || unreachable!()).unwrap();
    assert_eq!(service.content_digest().unwrap(), digest);
    let next = one_sector_file(&service, &writer, &[9; 512]);
    assert!(next > inode);
    assert_eq!(
        service
            .read_meta(inode)
            .unwrap()
            .unwrap()
            .body()
            .sector_count,
        1
    );
}

/// The log is purged by bytes, not only every `snapshot_every` entries: an
/// entry is a whole write batch, so a count alone would let it grow without
/// bound. What was purged is still there after a reopen (in the engine).
#[test]
fn the_log_is_kept_within_its_byte_budget_and_reopens() {
    let (_domain, writer, dir, info) = setup();
    let budget = 64 << 10;
    let config = || {
        let mut config = RaftConfig::new(&dir);
        config.log_bytes = budget;
        config
    };
    let service = RaftService::open_or_create(config(), || Ok(info.clone())).unwrap();
    // About 5 KiB an entry: 100 entries are several budgets.
    let inodes: Vec<u64> = (0..100u8)
        .map(|i| one_sector_file(&service, &writer, &[i; 4096]))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.log_bytes() > budget && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = service.log_bytes();
    assert!(
        held <= budget,
        "the log holds {held} bytes, over its budget of {budget}"
    );
    assert!(held > 0, "the purge kept nothing for followers");
    let digest = service.content_digest().unwrap();
    drop(service);

    let service = RaftService::open_or_create(config(), || unreachable!()).unwrap();
    assert_eq!(service.content_digest().unwrap(), digest);
    assert!(service.log_bytes() <= budget);
    for (i, inode) in inodes.iter().enumerate() {
        assert_eq!(
            service.read_data(*inode, &[0], None).unwrap(),
            vec![Some(vec![i as u8; 4096])]
        );
    }
}

/// Flips a byte in the middle of every run of `pattern` in the segment files
/// below `dir`; returns how many it flipped.
fn flip_runs(dir: &std::path::Path, pattern: &[u8]) -> usize {
    let mut flipped = 0;
    for entry in walk(dir) {
        if entry.extension().is_none_or(|ext| ext != "seg") {
            continue;
        }
        let mut bytes = std::fs::read(&entry).unwrap();
        let mut at = 0;
        let mut changed = false;
        while let Some(found) = bytes[at..]
            .windows(pattern.len())
            .position(|window| window == pattern)
        {
            bytes[at + found + pattern.len() / 2] ^= 0x5a;
            flipped += 1;
            changed = true;
            at += found + pattern.len();
        }
        if changed {
            std::fs::write(&entry, &bytes).unwrap();
        }
    }
    flipped
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A damaged entry of the Raft log that the state machine has applied is
/// purged when the member opens (the sectors hold what it did) instead of
/// keeping the member from starting.
#[test]
fn a_damaged_applied_log_entry_is_purged_at_open() {
    let (_domain, writer, dir, info) = setup();
    let service = RaftService::open_or_create(RaftConfig::new(&dir), || Ok(info.clone())).unwrap();
    let damaged = one_sector_file(&service, &writer, &[0x5c; 4096]);
    let other = one_sector_file(&service, &writer, &[0x3e; 4096]);
    let digest = service.content_digest().unwrap();
    drop(service);

    // The pattern is in the log's entry and in the sector store: flip only
    // the log's copy.
    assert!(flip_runs(&dir.join("raft-log"), &[0x5c; 4096]) >= 1);
    let service = RaftService::open_or_create(RaftConfig::new(&dir), || unreachable!()).unwrap();
    assert_eq!(service.content_digest().unwrap(), digest);
    assert_eq!(
        service.read_data(damaged, &[0], None).unwrap(),
        vec![Some(vec![0x5c; 4096])]
    );
    assert_eq!(
        service.read_data(other, &[0], None).unwrap(),
        vec![Some(vec![0x3e; 4096])]
    );
    // The log goes on after the purge, and reopens again.
    let later = one_sector_file(&service, &writer, &[0x11; 4096]);
    drop(service);
    let service = RaftService::open_or_create(RaftConfig::new(&dir), || unreachable!()).unwrap();
    assert_eq!(
        service.read_data(later, &[0], None).unwrap(),
        vec![Some(vec![0x11; 4096])]
    );
}

/// A paced scrub reads what an unpaced one reads, and never faster on average
/// than its rate.
#[test]
fn a_paced_scrub_keeps_under_its_rate() {
    let (_domain, writer, dir, info) = setup();
    let service = RaftService::open_or_create(RaftConfig::new(&dir), || Ok(info.clone())).unwrap();
    for byte in 0..16u8 {
        one_sector_file(&service, &writer, &vec![byte; 64 << 10]);
    }
    let unpaced = service.scrub().unwrap();
    assert!(unpaced.bytes_read >= 16 * (64 << 10), "{unpaced:?}");
    assert_eq!((unpaced.corrupt, unpaced.repaired), (0, 0));
    let rate = 2 << 20;
    let started = Instant::now();
    let paced = service.scrub_paced(rate).unwrap();
    let took = started.elapsed();
    assert_eq!(paced, unpaced);
    let floor = Duration::from_secs_f64(paced.bytes_read as f64 / rate as f64);
    assert!(
        took >= floor,
        "{took:?} for {} bytes at {rate} bytes/s",
        paced.bytes_read
    );
}
