//! A [`SectorBatch`] on the wire, as a follower forwards it to the leader
//! (the leader verifies it: nothing here is trusted). The encoding is
//! versioned like the log's (`[version][kind][postcard]`, [`crate::codec`]);
//! each file's metadata is carried in core's own encoding and decoded with
//! core's bounded decoder. Decoding returns errors and never panics.

use crate::codec::{self, CodecError, RaftKind};
use crate::service::{FileWrite, SectorBatch};
use blocktree_core::encoding;
use blocktree_core::metadata::FileMeta;
use serde::{Deserialize, Serialize};

/// The largest encoded batch a follower forwards: bttp refuses messages over
/// 64 MiB ([`crate::raft`]'s member limits), and the message around the batch
/// needs a little room.
pub const MAX_FORWARDED_BATCH: usize = 63 << 20;

/// One file of a batch, borrowed for encoding.
#[derive(Serialize)]
struct FileOut<'a> {
    #[serde(with = "serde_bytes")]
    meta: &'a [u8],
    data: Vec<(u64, &'a serde_bytes::Bytes)>,
    holes: &'a [u64],
}

/// A batch, borrowed for encoding.
#[derive(Serialize)]
struct BatchOut<'a> {
    files: Vec<FileOut<'a>>,
    removes: Vec<serde_bytes::ByteBuf>,
}

/// One file of a batch as decoded.
#[derive(Deserialize)]
struct FileIn {
    meta: serde_bytes::ByteBuf,
    data: Vec<(u64, serde_bytes::ByteBuf)>,
    holes: Vec<u64>,
}

/// A batch as decoded.
#[derive(Deserialize)]
struct BatchIn {
    files: Vec<FileIn>,
    removes: Vec<serde_bytes::ByteBuf>,
}

/// Encodes `batch` for forwarding.
pub fn encode_batch(batch: &SectorBatch) -> Vec<u8> {
    // Metadata is small; it is encoded once here, the records are borrowed.
    let metas: Vec<Vec<u8>> = batch
        .files
        .iter()
        .map(|file| encoding::encode(&file.meta))
        .collect();
    let out = BatchOut {
        files: batch
            .files
            .iter()
            .zip(&metas)
            .map(|(file, meta)| FileOut {
                meta,
                data: file
                    .data
                    .iter()
                    .map(|(index, record)| (*index, serde_bytes::Bytes::new(record)))
                    .collect(),
                holes: &file.holes,
            })
            .collect(),
        removes: batch
            .removes
            .iter()
            .map(|meta| serde_bytes::ByteBuf::from(encoding::encode(meta)))
            .collect(),
    };
    codec::encode(RaftKind::SectorBatch, &out)
}

/// Decodes a forwarded batch; every file's metadata must decode too.
pub fn decode_batch(bytes: &[u8]) -> Result<SectorBatch, CodecError> {
    let batch: BatchIn = codec::decode(RaftKind::SectorBatch, bytes)?;
    let meta = |bytes: &[u8]| {
        encoding::decode::<FileMeta>(bytes).map_err(|error| CodecError::Malformed {
            kind: RaftKind::SectorBatch,
            reason: format!("file metadata: {error}"),
        })
    };
    let mut files = Vec::with_capacity(batch.files.len());
    for file in batch.files {
        files.push(FileWrite {
            meta: meta(&file.meta)?,
            data: file
                .data
                .into_iter()
                .map(|(index, record)| (index, record.into_vec()))
                .collect(),
            holes: file.holes,
        });
    }
    let removes = batch
        .removes
        .iter()
        .map(|bytes| meta(bytes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SectorBatch { files, removes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_truncated_foreign_and_trailing_bytes() {
        let empty = encode_batch(&SectorBatch::default());
        let decoded = decode_batch(&empty).unwrap();
        assert!(decoded.files.is_empty() && decoded.removes.is_empty());
        assert!(decode_batch(&empty[..1]).is_err());
        let mut trailing = empty.clone();
        trailing.push(0);
        assert!(decode_batch(&trailing).is_err());
        let mut other_kind = empty;
        other_kind[1] = RaftKind::Vote as u8;
        assert!(decode_batch(&other_kind).is_err());
        // One file whose metadata is garbage.
        let garbage = codec::encode(
            RaftKind::SectorBatch,
            &(
                vec![(
                    serde_bytes::ByteBuf::from(vec![1, 2, 3]),
                    Vec::<u64>::new(),
                    Vec::<u64>::new(),
                )],
                Vec::<serde_bytes::ByteBuf>::new(),
            ),
        );
        assert!(matches!(
            decode_batch(&garbage),
            Err(CodecError::Malformed { .. })
        ));
    }
}
