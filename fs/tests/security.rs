//! Readcaps, write verification by the sector service, and tampering: what a
//! store or a principal without authority cannot do.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use blocktree_core::credstore::{CredStore, RuntimeSigner};
use blocktree_core::encoding;
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::metadata::FileMeta;
use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_engine::{EngineConfig, WriteBatch};
use blocktree_fs::{ENCRYPT_XATTR, FileSystem, FsConfig, FsError};
use blocktree_raftlog::{FileWrite, SectorBatch, SectorService, ServiceError};
use common::*;
use std::sync::Arc;

const R: u64 = FileSystem::ROOT;

fn write_file(fs: &FileSystem, parent: u64, name: &str, data: &[u8]) -> u64 {
    let (attr, fh) = fs
        .create(&root(), parent, name.as_bytes(), 0o644, 0, libc::O_WRONLY)
        .unwrap();
    fs.write(fh, 0, data).unwrap();
    fs.fsync(fh, false).unwrap();
    fs.release(fh).unwrap();
    attr.ino
}

#[test]
fn a_readcap_on_the_parent_directory_opens_the_subtree() {
    let domain = Domain::new();
    let bob = domain.other_principal("bob");
    let (secret, file) = {
        let fs = domain.mount(FsConfig {
            encrypt_root: false,
            ..FsConfig::default()
        });
        let secret = fs.mkdir(&root(), R, b"secret", 0o755, 0).unwrap().ino;
        fs.setxattr(&root(), R, ENCRYPT_XATTR, b"on", 0).unwrap();
        let vault = fs.mkdir(&root(), R, b"vault", 0o755, 0).unwrap().ino;
        let file = write_file(&fs, vault, "plans", b"the plans");
        (secret, (vault, file))
    };
    let _ = secret;
    {
        let fs = mount_with(&domain.data(), bob.clone(), FsConfig::default());
        // The root is not encrypted: bob can list it, but not open the vault.
        let vault = fs.lookup(&root(), R, b"vault");
        assert!(matches!(vault, Err(FsError::Access(_))), "{vault:?}");
        // Bob holds no writecap for the generation's directory: no changes.
        assert!(matches!(
            fs.mkdir(&root(), R, b"mine", 0o755, 0),
            Err(FsError::ReadOnly(_))
        ));
    }
    {
        let fs = domain.mount(FsConfig::default());
        let vault = fs.resolve(&root(), "/vault").unwrap();
        fs.grant_readcap(&root(), vault, &bob.encryption_public_key())
            .unwrap();
    }
    let fs = mount_with(&domain.data(), bob, FsConfig::default());
    let plans = fs.resolve(&root(), "/vault/plans").unwrap();
    assert_eq!(plans, file.1);
    let fh = fs.open(&root(), plans, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, 100).unwrap(), b"the plans");
}

fn service(domain: &Domain) -> Arc<blocktree_raftlog::RaftService> {
    blocktree_fs::local::open_service(
        &domain.data(),
        domain.creds.clone(),
        &blocktree_fs::local::Membership::Alone,
        &blocktree_fs::local::ServiceOptions::default(),
    )
    .unwrap()
}

/// A file written through the file system, then the store opened alone.
fn stored_file(domain: &Domain, data: &[u8]) -> u64 {
    let fs = domain.mount(FsConfig {
        encrypt_root: false,
        ..FsConfig::default()
    });
    write_file(&fs, R, "f", data)
}

fn resign(
    meta: FileMeta,
    creds: &dyn CredStore,
    change: impl FnOnce(&mut blocktree_core::metadata::MetaBody),
) -> FileMeta {
    let mut body = meta.into_body();
    change(&mut body);
    FileMeta::sign(body, &RuntimeSigner(creds)).unwrap()
}

#[test]
fn the_service_refuses_writes_that_do_not_verify() {
    let domain = Domain::new();
    let ino = stored_file(&domain, &[5u8; 10_000]);
    let service = service(&domain);
    let meta = service.read_meta(ino).unwrap().unwrap();
    let write = |meta: FileMeta, data: Vec<(u64, Vec<u8>)>| {
        service.write(SectorBatch {
            files: vec![FileWrite {
                meta,
                data,
                holes: vec![],
            }],
            removes: vec![],
        })
    };
    // A root that is not the tree's.
    let forged_root = resign(meta.clone(), domain.creds.as_ref(), |body| {
        body.merkle_root = HashAlgorithm::Sha256.hash(&[b"not the tree"]);
    });
    assert!(matches!(
        write(forged_root, vec![]),
        Err(ServiceError::Inconsistent { .. })
    ));
    // A record that does not hash to the signed root.
    assert!(matches!(
        write(meta.clone(), vec![(0, vec![9u8; 4096])]),
        Err(ServiceError::Inconsistent { .. })
    ));
    // A record of the wrong size.
    assert!(matches!(
        write(meta.clone(), vec![(0, vec![9u8; 100])]),
        Err(ServiceError::Inconsistent { .. })
    ));
    // A signature that does not verify.
    let mut bytes = encoding::encode(&meta);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let forged: FileMeta = encoding::decode(&bytes).unwrap();
    assert!(matches!(
        write(forged, vec![]),
        Err(ServiceError::Unauthorized { .. })
    ));
    // A writer from another domain.
    let stranger = Domain::new();
    let foreign = resign(meta.clone(), stranger.creds.as_ref(), |body| {
        body.writecap = stranger.creds.writecap().unwrap().clone();
    });
    assert!(matches!(
        write(foreign, vec![]),
        Err(ServiceError::Unauthorized { .. })
    ));
    // A writer of this domain whose writecap does not cover the generation.
    let bob = domain.other_principal("bob");
    let narrow = resign(meta.clone(), bob.as_ref(), |body| {
        body.writecap = bob.writecap().unwrap().clone();
    });
    assert!(matches!(
        write(narrow, vec![]),
        Err(ServiceError::Unauthorized { .. })
    ));
    // The file is unchanged after all that.
    drop(service);
    let fs = domain.mount(FsConfig::default());
    let f = fs.resolve(&root(), "/f").unwrap();
    let fh = fs.open(&root(), f, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, 20_000).unwrap(), vec![5u8; 10_000]);
}

/// A stored file of four 4 KiB sectors (sector i full of i + 1) whose sector 2
/// was then replaced behind the service's back, as a malicious store would:
/// straight into the state machine's engine, with the service closed.
fn file_with_a_swapped_sector(domain: &Domain) -> u64 {
    let mut data = Vec::new();
    for sector in 0..4u8 {
        data.extend(std::iter::repeat_n(sector + 1, 4096));
    }
    let ino = stored_file(domain, &data);
    let generation = blocktree_fs::local::LOCAL_GENERATION;
    let dir = domain
        .data()
        .join(blocktree_fs::local::SECTORS_DIR)
        .join("engine");
    let engine =
        blocktree_engine::Engine::open_or_create(EngineConfig::new(dir), generation).unwrap();
    let mut batch = WriteBatch::new();
    let id = SectorId {
        generation,
        inode: ino,
        sector: SectorKind::Data(2),
    };
    batch.put(id, vec![0xEE; 4096]);
    engine.write(batch).wait().unwrap();
    engine.shutdown().unwrap();
    ino
}

#[test]
fn a_sector_swapped_under_the_store_reads_as_eio_and_only_it() {
    let domain = Domain::new();
    file_with_a_swapped_sector(&domain);
    let fs = domain.mount(FsConfig::default());
    let f = fs.resolve(&root(), "/f").unwrap();
    let fh = fs.open(&root(), f, libc::O_RDONLY).unwrap();
    assert!(matches!(fs.read(fh, 2 * 4096, 10), Err(FsError::Io(_))));
    assert!(matches!(fs.read(fh, 0, 4 * 4096), Err(FsError::Io(_))));
    assert_eq!(fs.read(fh, 0, 4096).unwrap(), vec![1u8; 4096]);
    assert_eq!(fs.read(fh, 3 * 4096, 4096).unwrap(), vec![4u8; 4096]);
}

/// `read_many` (NBD's queued reads, fetched together) returns what each read
/// returns alone: buffered writes, the end of the file, and EIO for the ranges
/// that touch the swapped sector only.
#[test]
fn reads_fetched_together_match_reads_alone_and_fail_alone() {
    let domain = Domain::new();
    file_with_a_swapped_sector(&domain);
    let fs = domain.mount(FsConfig::default());
    let f = fs.resolve(&root(), "/f").unwrap();
    let fh = fs.open(&root(), f, libc::O_RDWR).unwrap();
    // Buffered in the file handle, not yet in the store.
    fs.write(fh, 4096 + 100, &[9u8; 50]).unwrap();
    let ranges = [
        (0, 4096),
        (4096, 4096),
        (2 * 4096, 10),
        (3 * 4096 - 100, 200),
        (3 * 4096, 4096),
        (4 * 4096 - 10, 100),
        (64 * 4096, 10),
        (0, 4096),
    ];
    let together = fs.read_many(fh, &ranges);
    assert_eq!(together.len(), ranges.len());
    let mut failed = Vec::new();
    for (&(offset, size), result) in ranges.iter().zip(together) {
        match fs.read(fh, offset, size) {
            Ok(alone) => assert_eq!(result.unwrap(), alone, "{size} bytes at {offset}"),
            Err(FsError::Io(_)) => {
                assert!(
                    matches!(result, Err(FsError::Io(_))),
                    "{size} bytes at {offset}"
                );
                failed.push(offset);
            }
            Err(error) => panic!("{size} bytes at {offset}: {error}"),
        }
    }
    assert_eq!(failed, [2 * 4096, 3 * 4096 - 100]);
    let buffered = fs.read_many(fh, &[(4096 + 100, 50), (4096, 100)]);
    assert_eq!(buffered[0].as_ref().unwrap(), &vec![9u8; 50]);
    assert_eq!(buffered[1].as_ref().unwrap(), &vec![2u8; 100]);
}

#[test]
fn subscribers_hear_of_every_committed_sector() {
    let domain = Domain::new();
    let fs = domain.mount(FsConfig::default());
    let (attr, fh) = fs
        .create(&root(), R, b"watched", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let events = fs.subscribe(attr.ino);
    fs.write(fh, 0, &vec![1u8; 3 * 4096]).unwrap();
    // Notifications come when a write is committed: fsync commits.
    fs.fsync(fh, false).unwrap();
    let ids: Vec<SectorId> = events.try_iter().collect();
    let data: Vec<_> = ids
        .iter()
        .filter_map(|id| match id.sector {
            SectorKind::Data(index) => Some(index),
            _ => None,
        })
        .collect();
    assert_eq!(data, vec![0, 1, 2]);
    assert!(ids.iter().any(|id| id.sector == SectorKind::Meta));
    assert!(ids.iter().all(|id| id.inode == attr.ino));
}
