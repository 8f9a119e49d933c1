//! A one-member cluster without network, as the filesystem's local store will
//! open it: every write goes through Raft, and it survives a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::credstore::{CredStore, FileCredStore, RuntimeSigner};
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::{FileMeta, MetaBody, MetaSecrets, SecretsPart};
use blocktree_core::readcap::{FileIds, ParentTable, ReadcapTable, SALT_LEN};
use blocktree_raftlog::service::{FileWrite, SectorBatch, SectorService};
use blocktree_raftlog::{GenerationInfo, RaftConfig, RaftService};
use common::Domain;

fn one_sector_file(service: &RaftService, writer: &dyn CredStore, bytes: &[u8]) -> u64 {
    let inode = service.allocate_inode().unwrap();
    let mut tree = MerkleTree::new(HashAlgorithm::Sha256);
    tree.update_leaf_hashes([(0, MerkleTree::leaf_hash(HashAlgorithm::Sha256, bytes))])
        .unwrap();
    let body = MetaBody {
        ids: FileIds {
            generation: service.generation(),
            inode,
        },
        sector_size: bytes.len() as u32,
        hash_algorithm: HashAlgorithm::Sha256,
        merkle_root: tree.root(),
        sector_count: 1,
        writer: writer.signing_public_key(),
        writecap: writer.writecap().cloned().unwrap(),
        readcaps: ReadcapTable::default(),
        parents: ParentTable::default(),
        salt: [0; SALT_LEN],
        keys: None,
        secrets: SecretsPart::Clear(MetaSecrets::default()),
    };
    let meta = FileMeta::sign(body, &RuntimeSigner(writer)).unwrap();
    service
        .write(SectorBatch {
            files: vec![FileWrite {
                meta,
                data: vec![(0, bytes.to_vec())],
                holes: Vec::new(),
            }],
            removes: Vec::new(),
        })
        .unwrap();
    inode
}

#[test]
fn a_local_one_member_cluster_writes_through_raft_and_reopens() {
    let domain = Domain::new();
    let (writer_dir, _) = domain.store(&["cluster"]);
    let writer = FileCredStore::open(&writer_dir).unwrap();
    let dir = domain.dir.path().join("local");
    let info = GenerationInfo {
        generation: 1,
        directory: domain.directory(),
    };
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
