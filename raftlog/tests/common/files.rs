//! Files the in-process tests write straight to a sector service: clear
//! (unencrypted) metadata signed by a writer, as the file system would sign it.

use blocktree_core::credstore::{CredStore, RuntimeSigner};
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::{FileMeta, MetaBody, MetaSecrets, SecretsPart};
use blocktree_core::readcap::{FileIds, ParentTable, ReadcapTable, SALT_LEN};
use blocktree_raftlog::service::{FileWrite, SectorBatch, SectorService};

/// Metadata of clear file `inode` of `generation` whose sectors of
/// `sector_size` bytes hash into `tree`, signed by `writer`.
pub fn clear_meta(
    writer: &dyn CredStore,
    generation: u64,
    inode: u64,
    sector_size: u32,
    tree: &MerkleTree,
) -> FileMeta {
    let body = MetaBody {
        ids: FileIds { generation, inode },
        sector_size,
        hash_algorithm: HashAlgorithm::Sha256,
        merkle_root: tree.root(),
        sector_count: tree.leaf_count(),
        writer: writer.signing_public_key(),
        writecap: writer.writecap().cloned().unwrap(),
        readcaps: ReadcapTable::default(),
        parents: ParentTable::default(),
        salt: [0; SALT_LEN],
        keys: None,
        secrets: SecretsPart::Clear(MetaSecrets::default()),
    };
    FileMeta::sign(body, &RuntimeSigner(writer)).unwrap()
}

/// Writes a new one-sector file holding `bytes`; returns its inode.
pub fn one_sector_file(service: &dyn SectorService, writer: &dyn CredStore, bytes: &[u8]) -> u64 {
    let inode = service.allocate_inode().unwrap();
    let mut tree = MerkleTree::new(HashAlgorithm::Sha256);
    tree.update_leaf_hashes([(0, MerkleTree::leaf_hash(HashAlgorithm::Sha256, bytes))])
        .unwrap();
    let meta = clear_meta(
        writer,
        service.generation(),
        inode,
        bytes.len() as u32,
        &tree,
    );
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
