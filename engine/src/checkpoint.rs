//! Checkpoints: a shard's index written out, so opening a store reads it instead
//! of scanning every segment.
//!
//! All shards checkpoint together, at a point where every write batch is either
//! wholly before the checkpoint or wholly after it (the engine holds new batches
//! back until each shard has no batch in flight). Each shard writes
//! `shard-<s>/checkpoint-<epoch>`; once all are durable, `<dir>/checkpoint` is
//! replaced to name the epoch. A crash between the two leaves the previous epoch
//! in force, and the new shard files are ignored: never a mix of epochs, which
//! could split a batch between a checkpoint and a log tail.
//!
//! ```text
//! shard file = header (56 B) · segment* (12 B) · entry* (26 B) · crc32c u32
//! header     = magic "BTCKPT01" · epoch u64 · replay_segment u32 · segments u32 ·
//!              next_sequence u64 · synced_through u64 · entries u64 · replay_offset u64
//! segment    = id u32 · live_bytes u64
//! entry      = key [16] · packed location [10]
//! store file = magic "BTCKHEAD" · epoch u64 · next_batch u64 · crc32c u32
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::EngineError;
use crate::index::{Index, PACKED_LOC_LEN};
use crate::record::Key;

const SHARD_MAGIC: [u8; 8] = *b"BTCKPT01";
const HEAD_MAGIC: [u8; 8] = *b"BTCKHEAD";
const HEADER_LEN: usize = 56;
const SEGMENT_LEN: usize = 12;
const ENTRY_LEN: usize = 16 + PACKED_LOC_LEN;
const HEAD_LEN: usize = 28;
/// The store-level file naming the checkpoint epoch in force.
pub(crate) const HEAD_FILE: &str = "checkpoint";

/// What a shard's checkpoint holds.
pub struct ShardCheckpoint {
    pub(crate) head: CheckpointHead,
    pub(crate) index: Index,
}

/// A shard checkpoint's fields besides its index. A shard encodes them with
/// its index in place ([`CheckpointHead::encode_with`]), so taking a
/// checkpoint does not copy the index.
pub(crate) struct CheckpointHead {
    pub(crate) epoch: u64,
    /// Segments from this number on are the log tail, to be scanned.
    pub(crate) replay_segment: u32,
    /// Where in `replay_segment` the tail starts.
    pub(crate) replay_offset: u64,
    pub(crate) next_sequence: u64,
    pub(crate) synced_through: u64,
    /// Live on-disk bytes of each segment before `replay_segment`.
    pub(crate) segments: BTreeMap<u32, u64>,
}

impl CheckpointHead {
    /// Encodes a checkpoint of `index` with these fields.
    pub(crate) fn encode_with(&self, index: &Index) -> Vec<u8> {
        let entries = index.len();
        let mut out = Vec::with_capacity(
            HEADER_LEN + self.segments.len() * SEGMENT_LEN + entries * ENTRY_LEN + 4,
        );
        out.extend_from_slice(&SHARD_MAGIC);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.replay_segment.to_le_bytes());
        out.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.next_sequence.to_le_bytes());
        out.extend_from_slice(&self.synced_through.to_le_bytes());
        out.extend_from_slice(&(entries as u64).to_le_bytes());
        out.extend_from_slice(&self.replay_offset.to_le_bytes());
        for (id, live) in &self.segments {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&live.to_le_bytes());
        }
        index.for_each_packed(|key, packed| {
            out.extend_from_slice(key);
            out.extend_from_slice(packed);
        });
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}

/// The path of shard `shard_dir`'s checkpoint of `epoch`.
pub(crate) fn shard_path(shard_dir: &Path, epoch: u64) -> PathBuf {
    shard_dir.join(format!("checkpoint-{epoch}"))
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

impl ShardCheckpoint {
    /// The epoch this checkpoint belongs to.
    pub fn epoch(&self) -> u64 {
        self.head.epoch
    }

    /// The number of index entries it holds.
    pub fn entries(&self) -> usize {
        self.index.len()
    }

    /// Encodes the checkpoint.
    pub fn encode(&self) -> Vec<u8> {
        self.head.encode_with(&self.index)
    }

    /// Decodes and checks a checkpoint; any damage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<ShardCheckpoint, String> {
        if bytes.len() < HEADER_LEN + 4 {
            return Err(format!("{} bytes is too short", bytes.len()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != le_u32(crc, 0) {
            return Err("checksum mismatch".into());
        }
        if body[..8] != SHARD_MAGIC {
            return Err("not a shard checkpoint".into());
        }
        let segments = le_u32(body, 20) as usize;
        let entries = le_u64(body, 40);
        let expected = (HEADER_LEN as u64)
            .checked_add(segments as u64 * SEGMENT_LEN as u64)
            .and_then(|len| entries.checked_mul(ENTRY_LEN as u64)?.checked_add(len));
        if expected != Some(body.len() as u64) {
            return Err(format!(
                "{} bytes do not hold {segments} segments and {entries} entries",
                body.len()
            ));
        }
        let mut segment_map = BTreeMap::new();
        let mut at = HEADER_LEN;
        for _ in 0..segments {
            segment_map.insert(le_u32(body, at), le_u64(body, at + 4));
            at += SEGMENT_LEN;
        }
        let mut index = Index::with_capacity(entries as usize);
        for entry in body[at..].chunks_exact(ENTRY_LEN) {
            let mut key: Key = [0u8; 16];
            key.copy_from_slice(&entry[..16]);
            let mut packed = [0u8; PACKED_LOC_LEN];
            packed.copy_from_slice(&entry[16..]);
            index.insert_packed(key, packed);
        }
        Ok(ShardCheckpoint {
            head: CheckpointHead {
                epoch: le_u64(body, 8),
                replay_segment: le_u32(body, 16),
                replay_offset: le_u64(body, 48),
                next_sequence: le_u64(body, 24),
                synced_through: le_u64(body, 32),
                segments: segment_map,
            },
            index,
        })
    }
}

/// Removes the shard checkpoints of epochs other than `keep` (best effort: a
/// leftover file is never read, since the head names the epoch in force).
pub(crate) fn remove_stale(shard_dir: &Path, keep: u64) {
    let Ok(entries) = fs::read_dir(shard_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let stale = name
            .to_str()
            .and_then(|name| name.strip_prefix("checkpoint-"))
            .and_then(|epoch| epoch.parse::<u64>().ok())
            .is_some_and(|epoch| epoch != keep);
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Encodes the store-level file.
pub(crate) fn encode_head(epoch: u64, next_batch: u64) -> [u8; HEAD_LEN] {
    let mut out = [0u8; HEAD_LEN];
    out[..8].copy_from_slice(&HEAD_MAGIC);
    out[8..16].copy_from_slice(&epoch.to_le_bytes());
    out[16..24].copy_from_slice(&next_batch.to_le_bytes());
    let crc = crc32c::crc32c(&out[..24]);
    out[24..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes the store-level file: (epoch, next batch id).
pub fn decode_head(bytes: &[u8]) -> Result<(u64, u64), String> {
    if bytes.len() != HEAD_LEN || bytes[..8] != HEAD_MAGIC {
        return Err("not a checkpoint head".into());
    }
    if crc32c::crc32c(&bytes[..24]) != le_u32(bytes, 24) {
        return Err("checksum mismatch".into());
    }
    Ok((le_u64(bytes, 8), le_u64(bytes, 16)))
}

/// Reads the store-level file of `dir`; `None` when no checkpoint was ever made.
pub(crate) fn load_head(dir: &Path) -> Result<Option<(u64, u64)>, EngineError> {
    let path = dir.join(HEAD_FILE);
    match fs::read(&path) {
        Ok(bytes) => decode_head(&bytes)
            .map(Some)
            .map_err(|reason| EngineError::Damaged { path, reason }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(EngineError::io("reading", path)(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Loc;

    #[test]
    fn round_trip_and_damage() {
        let mut index = Index::default();
        for byte in 0..50u8 {
            index.insert(
                [byte; 16],
                Loc {
                    segment: byte as u32,
                    offset: byte as u64 * 16,
                    len: 4096,
                },
            );
        }
        let checkpoint = ShardCheckpoint {
            head: CheckpointHead {
                epoch: 3,
                replay_segment: 9,
                replay_offset: 8192,
                next_sequence: 77,
                synced_through: 76,
                segments: BTreeMap::from([(1, 100), (4, 200)]),
            },
            index,
        };
        let bytes = checkpoint.encode();
        let decoded = ShardCheckpoint::decode(&bytes).unwrap();
        assert_eq!(decoded.head.epoch, 3);
        assert_eq!(decoded.head.replay_segment, 9);
        assert_eq!(decoded.head.replay_offset, 8192);
        assert_eq!(decoded.head.next_sequence, 77);
        assert_eq!(decoded.head.segments, checkpoint.head.segments);
        assert_eq!(decoded.index.len(), 50);
        assert_eq!(decoded.index.get(&[7; 16]).unwrap().offset, 112);
        for cut in [0, 10, bytes.len() - 1] {
            assert!(ShardCheckpoint::decode(&bytes[..cut]).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[60] ^= 1;
        assert!(ShardCheckpoint::decode(&flipped).is_err());
        assert_eq!(decode_head(&encode_head(5, 9)), Ok((5, 9)));
    }
}
