//! Write verification and read authorization, done by the sector service before
//! anything is stored or served (original design §3.1):
//!
//! 1. the writecap chain in the new metadata is valid for the generation's
//!    directory, rooted at the directory's root principal, unexpired, unrevoked;
//! 2. the metadata signature verifies with the writer's key, the chain's subject;
//! 3. the new records are hashed into the file's Merkle tree;
//! 4. the recomputed root equals the signed one.
//!
//! A read of an encrypted file's data needs a readcap for the reader on the file or
//! on an ancestor reached through the parent tables.

use crate::pieces;
use crate::service::{FileWrite, ReadAccess, ServiceError};
use blocktree_core::BtPath;
use blocktree_core::merkle::{MAX_LEAF_COUNT, MerkleTree};
use blocktree_core::metadata::FileMeta;
use blocktree_core::readcap::FileIds;
use blocktree_core::sector::RECORD_OVERHEAD;
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::RevocationList;
use std::collections::BTreeSet;

/// The largest data sector a file may declare: what one engine record holds.
pub const MAX_SECTOR_SIZE: u32 = 1 << 20;

/// Steps 1 and 2: the metadata is signed by a writer whose writecap covers
/// `directory`, and it belongs to `generation`.
pub fn verify_meta(
    meta: &FileMeta,
    generation: u64,
    directory: &BtPath,
    now: Timestamp,
    revoked: &RevocationList,
) -> Result<(), ServiceError> {
    verify_meta_with(meta, generation, |meta| {
        meta.verify(directory, now, revoked)
    })
}

/// [`verify_meta`] with the signature and writecap checks done by `check`, so a
/// caller can skip re-verifying a chain it verified before
/// ([`FileMeta::verify_known_chain`]).
pub fn verify_meta_with(
    meta: &FileMeta,
    generation: u64,
    check: impl FnOnce(&FileMeta) -> Result<(), blocktree_core::metadata::MetaError>,
) -> Result<(), ServiceError> {
    let body = meta.body();
    let inode = body.ids.inode;
    if body.ids.generation != generation {
        return Err(ServiceError::Invalid(format!(
            "inode {inode} belongs to generation {}, this service stores {generation}",
            body.ids.generation
        )));
    }
    check(meta).map_err(|source| ServiceError::Unauthorized {
        inode,
        source: Box::new(source),
    })?;
    if body.sector_size == 0 || body.sector_size > MAX_SECTOR_SIZE {
        return Err(ServiceError::Invalid(format!(
            "inode {inode}: sector size {} is outside 1..={MAX_SECTOR_SIZE}",
            body.sector_size
        )));
    }
    if body.sector_count > MAX_LEAF_COUNT {
        return Err(ServiceError::Invalid(format!(
            "inode {inode}: {} sectors exceeds the limit",
            body.sector_count
        )));
    }
    Ok(())
}

/// What a file may never change after creation: sector size, hash, encryption.
pub fn check_immutable(old: &FileMeta, new: &FileMeta) -> Result<(), ServiceError> {
    let (old, new) = (old.body(), new.body());
    let inode = new.ids.inode;
    let refuse = |what: &str| {
        Err(ServiceError::Inconsistent {
            inode,
            reason: format!("the {what} of a file is fixed at creation"),
        })
    };
    if old.sector_size != new.sector_size {
        return refuse("sector size");
    }
    if old.hash_algorithm != new.hash_algorithm {
        return refuse("hash algorithm");
    }
    if old.keys.is_some() != new.keys.is_some() {
        return refuse("encryption");
    }
    Ok(())
}

/// The length every stored data record of this file has.
pub fn record_len(meta: &FileMeta) -> usize {
    let body = meta.body();
    let sector = body.sector_size as usize;
    if body.keys.is_some() {
        sector + RECORD_OVERHEAD
    } else {
        sector
    }
}

/// Steps 3 and 4: applies `write` to `tree` (the file's current tree) and checks
/// the new root against the signed one. Returns the pieces to store. On error the
/// tree is left in an unspecified state: the caller reloads it.
pub fn apply_write(
    tree: &mut MerkleTree,
    write: &FileWrite,
) -> Result<BTreeSet<u64>, ServiceError> {
    let body = write.meta.body();
    let inode = body.ids.inode;
    let algorithm = body.hash_algorithm;
    if tree.algorithm() != algorithm {
        return Err(ServiceError::Inconsistent {
            inode,
            reason: "the hash algorithm differs from the stored tree's".into(),
        });
    }
    let old_count = tree.leaf_count();
    let new_count = body.sector_count;
    let expected_len = record_len(&write.meta);
    let mut seen = BTreeSet::new();
    for (index, record) in &write.data {
        if *index >= new_count {
            return Err(ServiceError::Inconsistent {
                inode,
                reason: format!("data sector {index} is past the file's {new_count} sectors"),
            });
        }
        if record.len() != expected_len {
            return Err(ServiceError::Inconsistent {
                inode,
                reason: format!(
                    "data sector {index} is {} bytes, records of this file are {expected_len}",
                    record.len()
                ),
            });
        }
        if !seen.insert(*index) {
            return Err(ServiceError::Inconsistent {
                inode,
                reason: format!("data sector {index} appears twice"),
            });
        }
    }
    for index in &write.holes {
        if *index >= new_count || !seen.insert(*index) {
            return Err(ServiceError::Inconsistent {
                inode,
                reason: format!("hole {index} is past the end or also written"),
            });
        }
    }
    tree.truncate(new_count);
    let hole = MerkleTree::leaf_hash(algorithm, &[]);
    let bytes = write.data.len() * expected_len;
    let mut leaves: Vec<(u64, _)> = pieces::parallel_map_chunks(&write.data, bytes, |part| {
        let records: Vec<&[u8]> = part.iter().map(|(_, record)| &record[..]).collect();
        let digests = MerkleTree::leaf_hashes(algorithm, &records);
        part.iter().map(|(index, _)| *index).zip(digests).collect()
    });
    leaves.extend(write.holes.iter().map(|index| (*index, hole)));
    if new_count > tree.leaf_count() && !seen.contains(&(new_count - 1)) {
        // Growth without a record for the new last sector: the gap is holes.
        leaves.push((new_count - 1, hole));
    }
    tree.update_leaf_hashes(leaves)?;
    if tree.leaf_count() != new_count || tree.root() != body.merkle_root {
        return Err(ServiceError::Inconsistent {
            inode,
            reason: "the recomputed Merkle root is not the signed one".into(),
        });
    }
    Ok(pieces::dirty_pieces(
        algorithm,
        seen.iter().copied(),
        old_count,
        new_count,
    ))
}

/// Checks that `access` lets its reader read inode `inode`, which is encrypted:
/// the chain starts at a file with a readcap for the reader and each later inode
/// is a child (parent-table entry) of the one before, ending at `inode`.
pub fn authorize_read(
    generation: u64,
    inode: u64,
    access: Option<&ReadAccess>,
    mut meta_of: impl FnMut(u64) -> Result<Option<FileMeta>, ServiceError>,
) -> Result<(), ServiceError> {
    let access = access.ok_or(ServiceError::NoReadcap(inode))?;
    let (Some(&first), Some(&last)) = (access.chain.first(), access.chain.last()) else {
        return Err(ServiceError::NoReadcap(inode));
    };
    if last != inode || access.chain.len() > 4096 {
        return Err(ServiceError::NoReadcap(inode));
    }
    let holder = meta_of(first)?.ok_or(ServiceError::NoReadcap(inode))?;
    let body = holder.body();
    if !body.readcaps.allows(&body.salt, &access.reader) {
        return Err(ServiceError::NoReadcap(inode));
    }
    for pair in access.chain.windows(2) {
        let [parent, child] = pair else { continue };
        let meta = meta_of(*child)?.ok_or(ServiceError::NoReadcap(inode))?;
        let body = meta.body();
        let parent = FileIds {
            generation,
            inode: *parent,
        };
        if !body.parents.has_parent(&body.salt, parent) {
            return Err(ServiceError::NoReadcap(inode));
        }
    }
    Ok(())
}
