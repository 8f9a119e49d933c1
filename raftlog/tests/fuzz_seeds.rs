//! Keeps the `raftlog_message` fuzz seeds valid: every seed decodes as a
//! message or a reply, and a forwarded batch round-trips.
//! `RAFTLOG_WRITE_FUZZ_SEEDS=1` rewrites the seeds of the forwarding
//! messages (a signed one-file batch, read index, inode reservation,
//! address update, a failure reply).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::credstore::FileCredStore;
use blocktree_core::encoding;
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::merkle::MerkleTree;
use blocktree_raftlog::forward::{decode_batch, encode_batch};
use blocktree_raftlog::network::{FailureKind, RaftMessage, RaftReply};
use blocktree_raftlog::service::{FileWrite, SectorBatch};
use blocktree_raftlog::types::MemberNode;
use common::Domain;
use common::files::clear_meta;
use std::path::PathBuf;

fn seeds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/raftlog_message")
}

fn batch(domain: &Domain) -> SectorBatch {
    let (writer_dir, _) = domain.store(&["cluster"]);
    let writer = FileCredStore::open(&writer_dir).unwrap();
    let record = vec![0x5a; 512];
    let mut tree = MerkleTree::new(HashAlgorithm::Sha256);
    tree.update_leaf_hashes([
        (0, MerkleTree::leaf_hash(HashAlgorithm::Sha256, &record)),
        (1, MerkleTree::leaf_hash(HashAlgorithm::Sha256, &[])),
    ])
    .unwrap();
    let meta = clear_meta(&writer, 2, 3, 512, &tree);
    SectorBatch {
        files: vec![FileWrite {
            meta: meta.clone(),
            data: vec![(0, record)],
            holes: vec![1],
        }],
        removes: vec![meta],
    }
}

#[test]
fn a_forwarded_batch_round_trips_and_the_seeds_decode() {
    let domain = Domain::new();
    let batch = batch(&domain);
    let encoded = encode_batch(&batch);
    let decoded = decode_batch(&encoded).unwrap();
    assert_eq!(encode_batch(&decoded), encoded);
    assert_eq!(
        encoding::encode(&decoded.files[0].meta),
        encoding::encode(&batch.files[0].meta)
    );
    assert_eq!(decoded.files[0].data, batch.files[0].data);
    assert_eq!(decoded.files[0].holes, vec![1]);
    assert_eq!(decoded.removes.len(), 1);
    // A flipped byte in the metadata is an error, not a panic.
    let mut damaged = encoded.clone();
    let at = damaged.len() / 3;
    damaged[at] ^= 0xff;
    let _ = decode_batch(&damaged);

    let dir = seeds_dir();
    if std::env::var_os("RAFTLOG_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        let messages = [
            (
                "forward-write",
                postcard::to_allocvec(&RaftMessage::ForwardWrite {
                    batch: serde_bytes::ByteBuf::from(encoded.clone()),
                })
                .unwrap(),
            ),
            ("batch", encoded.clone()),
            (
                "read-index",
                postcard::to_allocvec(&RaftMessage::ReadIndex).unwrap(),
            ),
            (
                "reserve-inodes",
                postcard::to_allocvec(&RaftMessage::ReserveInodes).unwrap(),
            ),
            (
                "allocate-generation",
                postcard::to_allocvec(&RaftMessage::AllocateGeneration {
                    directory: domain.directory(),
                })
                .unwrap(),
            ),
            (
                "generation-reply",
                postcard::to_allocvec(&RaftReply::Generation { generation: 2 }).unwrap(),
            ),
            (
                "update-node",
                postcard::to_allocvec(&RaftMessage::UpdateNode {
                    node: 7,
                    member: MemberNode {
                        addr: "127.0.0.1:4000".into(),
                        path: Some(domain.directory()),
                    },
                })
                .unwrap(),
            ),
            (
                "failed-reply",
                postcard::to_allocvec(&RaftReply::Failed {
                    kind: FailureKind::Unauthorized,
                    inode: 3,
                    reason: "writecap expired".into(),
                })
                .unwrap(),
            ),
        ];
        for (name, bytes) in messages {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let message = postcard::from_bytes::<RaftMessage>(&bytes);
        if let Ok(RaftMessage::ForwardWrite { batch }) = &message {
            decode_batch(batch).unwrap();
        }
        assert!(
            message.is_ok()
                || postcard::from_bytes::<RaftReply>(&bytes).is_ok()
                || decode_batch(&bytes).is_ok(),
            "a seed decodes as nothing"
        );
        seeds += 1;
    }
    assert!(seeds >= 6, "missing seeds in {}", dir.display());
}
