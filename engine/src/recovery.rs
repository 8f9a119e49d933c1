//! Opening a store: the layout file, and rebuilding each shard's index from its
//! log after a clean stop or a crash.
//!
//! Each shard starts from its checkpoint (see [`crate::checkpoint`]) and scans the
//! segments written after it, in order. A record counts only if its whole
//! batch is present: for every shard the batch names, that shard's log holds as
//! many of its records as the batch said (`part_len`). A batch cut short by a
//! crash is dropped everywhere, so after a crash each batch holds its old or its
//! new contents, never a mix. Records whose payload fails its checksum are kept
//! in the index when their chunk was synced (they are refused on read: corruption
//! is reported, not papered over with an older version) and treated as never
//! written when it was not (a torn write of a batch no one was told is durable).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use crate::checkpoint::{self, ShardCheckpoint};
use crate::engine::EngineConfig;
use crate::error::EngineError;
use crate::index::{Index, Loc, MAX_SEGMENT};
use crate::record::{self, BLOCK, ChunkHeader, Key, RecordError, RecordKind, record_footprint};
use crate::segment::{self, Segment};

const LAYOUT_FILE: &str = "layout";

/// Records the number of shards of a new store: keys are routed by it.
pub(crate) fn write_layout(config: &EngineConfig) -> Result<(), EngineError> {
    let path = config.dir.join(LAYOUT_FILE);
    fs::write(&path, format!("shards {}\n", config.shards))
        .map_err(EngineError::io("writing", &path))?;
    for shard in 0..config.shards {
        let dir = segment::shard_dir(&config.dir, shard);
        fs::create_dir_all(&dir).map_err(EngineError::io("creating", &dir))?;
    }
    fs::File::open(&config.dir)
        .and_then(|dir| dir.sync_all())
        .map_err(EngineError::io("syncing", &config.dir))
}

/// The number of shards the store was created with.
pub(crate) fn read_layout(config: &EngineConfig) -> Result<usize, EngineError> {
    let path = config.dir.join(LAYOUT_FILE);
    let text = fs::read_to_string(&path).map_err(EngineError::io("reading", &path))?;
    text.trim()
        .strip_prefix("shards ")
        .and_then(|count| count.parse().ok())
        .ok_or_else(|| EngineError::Damaged {
            path,
            reason: format!("expected 'shards N', found {text:?}"),
        })
}

/// What one shard starts from.
pub(crate) struct ShardState {
    pub index: Index,
    pub segments: BTreeMap<u32, Segment>,
    pub next_segment: u32,
    pub next_sequence: u64,
    /// The store's log id, stamped in every chunk.
    pub log_id: u64,
    /// Retired segment files waiting to be reused.
    pub spares: Vec<(std::path::PathBuf, u64)>,
}

/// What opening a store found.
pub(crate) struct Recovered {
    pub shards: Vec<ShardState>,
    pub next_batch: u64,
    /// The checkpoint epoch in force (0: none yet).
    pub epoch: u64,
}

#[derive(Default)]
struct BatchShape {
    shards: u32,
    expected: HashMap<usize, u32>,
    found: HashMap<usize, u32>,
}

impl BatchShape {
    fn complete(&self) -> bool {
        (0..32)
            .filter(|shard| self.shards & (1 << shard) != 0)
            .all(|shard| {
                let expected = self.expected.get(&shard);
                expected.is_some() && expected == self.found.get(&shard)
            })
    }
}

/// What one shard's log and checkpoint hold, before batches are matched up.
struct ShardScan {
    base: Index,
    segments: BTreeMap<u32, Segment>,
    records: Vec<ScannedRecord>,
    next_sequence: u64,
    max_batch: u64,
}

/// Loads each shard's checkpoint (if the store has one) and scans the log after
/// it, the shards in parallel; then keeps the tail records of complete batches.
pub(crate) fn recover(config: &EngineConfig, log_id: u64) -> Result<Recovered, EngineError> {
    let head = checkpoint::load_head(&config.dir)?;
    let scans: Vec<Result<ShardScan, EngineError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..config.shards)
            .map(|shard| {
                scope.spawn(move || scan_shard(config, shard, head.map(|(epoch, _)| epoch), log_id))
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker.join().unwrap_or_else(|_| {
                    Err(EngineError::Layout("a recovery thread panicked".into()))
                })
            })
            .collect()
    });
    let scans = scans.into_iter().collect::<Result<Vec<_>, _>>()?;

    let mut batches: HashMap<u64, BatchShape> = HashMap::new();
    let mut next_batch = head.map_or(1, |(_, next_batch)| next_batch);
    for (shard, scan) in scans.iter().enumerate() {
        next_batch = next_batch.max(scan.max_batch + 1);
        for record in &scan.records {
            let shape = batches.entry(record.batch).or_default();
            shape.shards |= record.shards;
            shape.expected.insert(shard, record.part_len);
            *shape.found.entry(shard).or_default() += 1;
        }
    }

    let mut shards = Vec::with_capacity(config.shards);
    for scan in scans {
        let ShardScan {
            base: mut index,
            segments: mut shard_segments,
            records,
            next_sequence,
            ..
        } = scan;
        for record in records {
            // Batch 0 is a record moved by compaction: always whole on its own.
            if record.batch != 0 && !batches.get(&record.batch).is_some_and(BatchShape::complete) {
                continue;
            }
            let previous = match record.kind {
                RecordKind::Put => {
                    if let Some(segment) = shard_segments.get_mut(&record.loc.segment) {
                        segment.live_bytes += record_footprint(record.loc.len as usize) as u64;
                    }
                    index.insert(record.key, record.loc)
                }
                RecordKind::Delete => index.remove(&record.key),
            };
            if let Some(previous) = previous
                && let Some(segment) = shard_segments.get_mut(&previous.segment)
            {
                segment.live_bytes = segment
                    .live_bytes
                    .saturating_sub(record_footprint(previous.len as usize) as u64);
            }
        }
        let next_segment = shard_segments.keys().next_back().map_or(1, |last| last + 1);
        if next_segment > MAX_SEGMENT {
            return Err(EngineError::Layout(
                "a shard has used up its segment numbers".into(),
            ));
        }
        let shard_dir = segment::shard_dir(&config.dir, shards.len());
        let spares = segment::list_spares(&shard_dir)?;
        shards.push(ShardState {
            index,
            segments: shard_segments,
            next_segment,
            next_sequence,
            log_id,
            spares,
        });
    }
    Ok(Recovered {
        shards,
        next_batch,
        epoch: head.map_or(0, |(epoch, _)| epoch),
    })
}

fn scan_shard(
    config: &EngineConfig,
    shard: usize,
    epoch: Option<u64>,
    log_id: u64,
) -> Result<ShardScan, EngineError> {
    let dir = segment::shard_dir(&config.dir, shard);
    fs::create_dir_all(&dir).map_err(EngineError::io("creating", &dir))?;
    let mut scan = ScanState {
        log_id,
        ..ScanState::default()
    };
    let mut live = BTreeMap::new();
    let mut replay_segment = 0;
    let mut replay_offset = 0;
    let mut base = Index::default();
    if let Some(epoch) = epoch {
        let path = checkpoint::shard_path(&dir, epoch);
        let bytes = fs::read(&path).map_err(EngineError::io("reading checkpoint", &path))?;
        let loaded = ShardCheckpoint::decode(&bytes)
            .map_err(|reason| EngineError::Damaged { path, reason })?;
        replay_segment = loaded.head.replay_segment;
        replay_offset = loaded.head.replay_offset;
        scan.last_sequence = loaded.head.next_sequence.saturating_sub(1);
        scan.synced_through = loaded.head.synced_through;
        live = loaded.head.segments;
        base = loaded.index;
    }
    let mut segments = BTreeMap::new();
    for id in segment::list(&dir)? {
        let mut segment = Segment::open(&dir, id, config.direct_io)?;
        segment.live_bytes = live.get(&id).copied().unwrap_or(0);
        if id >= replay_segment {
            let start = if id == replay_segment {
                replay_offset
            } else {
                0
            };
            let path = segment::segment_path(&dir, id);
            segment.written = scan_segment(&path, id, start, &mut scan)?.max(start);
        }
        segments.insert(id, segment);
    }
    Ok(ShardScan {
        base,
        segments,
        next_sequence: scan.last_sequence + 1,
        max_batch: scan.max_batch,
        records: scan.records,
    })
}

struct ScannedRecord {
    key: Key,
    kind: RecordKind,
    batch: u64,
    part_len: u32,
    shards: u32,
    loc: Loc,
    sequence: u64,
    intact: bool,
}

#[derive(Default)]
struct ScanState {
    records: Vec<ScannedRecord>,
    last_sequence: u64,
    synced_through: u64,
    max_batch: u64,
    log_id: u64,
}

/// Bytes of a segment read at a time while scanning it: a segment is up to
/// 256 MiB, and reading it whole made opening a store hold that much.
const SCAN_WINDOW: usize = 8 << 20;

/// A segment file read through a window of [`SCAN_WINDOW`] bytes (or one
/// chunk, if larger), moved forward as the scan goes.
struct SegmentWindow<'a> {
    path: &'a Path,
    file: fs::File,
    file_len: usize,
    start: usize,
    buffer: Vec<u8>,
}

impl<'a> SegmentWindow<'a> {
    fn open(path: &'a Path) -> Result<SegmentWindow<'a>, EngineError> {
        let file = fs::File::open(path).map_err(EngineError::io("opening segment", path))?;
        let file_len = file
            .metadata()
            .map_err(EngineError::io("reading segment", path))?
            .len();
        Ok(SegmentWindow {
            path,
            file,
            file_len: usize::try_from(file_len).unwrap_or(usize::MAX),
            start: 0,
            buffer: Vec::new(),
        })
    }

    /// The `len` bytes at `position` (fewer at the end of the file).
    fn bytes(&mut self, position: usize, len: usize) -> Result<&[u8], EngineError> {
        let len = len.min(self.file_len.saturating_sub(position));
        let held = position >= self.start && position + len <= self.start + self.buffer.len();
        if !held {
            let read_len = len
                .max(SCAN_WINDOW)
                .min(self.file_len.saturating_sub(position));
            self.buffer.resize(read_len, 0);
            std::os::unix::fs::FileExt::read_exact_at(
                &self.file,
                &mut self.buffer,
                position as u64,
            )
            .map_err(EngineError::io("reading segment", self.path))?;
            self.start = position;
        }
        let offset = position - self.start;
        Ok(&self.buffer[offset..offset + len])
    }
}

/// Scans one segment into `scan`; returns where its last valid chunk ends.
fn scan_segment(
    path: &Path,
    id: u32,
    start: u64,
    scan: &mut ScanState,
) -> Result<u64, EngineError> {
    let mut window = SegmentWindow::open(path)?;
    let file_len = window.file_len;
    let mut position = start as usize;
    let mut written_end = 0usize;
    let first_new = scan.records.len();
    while position + record::CHUNK_HEADER_LEN <= file_len {
        let header = match ChunkHeader::parse(window.bytes(position, record::CHUNK_HEADER_LEN)?) {
            Ok(header) if header.sequence > scan.last_sequence && header.log_id == scan.log_id => {
                header
            }
            // Unwritten space, a torn header, a stale chunk, or bytes that only
            // look like a header: look at the next block.
            Ok(_) | Err(RecordError::NoMagic | RecordError::Checksum | RecordError::Version(_)) => {
                position += BLOCK;
                continue;
            }
            Err(_) => {
                position += BLOCK;
                continue;
            }
        };
        let end = (position + header.disk_len()).min(file_len);
        if let Ok((_, entries)) = record::parse_chunk(window.bytes(position, end - position)?) {
            for (offset, entry) in entries {
                // A record whose header fails names no key: nothing to index.
                let Ok(parsed) = entry else { continue };
                scan.max_batch = scan.max_batch.max(parsed.header.batch);
                scan.records.push(ScannedRecord {
                    key: parsed.header.key,
                    kind: parsed.header.kind,
                    batch: parsed.header.batch,
                    part_len: parsed.header.part_len,
                    shards: parsed.header.shards,
                    loc: Loc {
                        segment: id,
                        offset: (position + offset) as u64,
                        len: parsed.header.payload_len,
                    },
                    sequence: header.sequence,
                    intact: parsed.payload_intact,
                });
            }
        }
        scan.last_sequence = header.sequence;
        scan.synced_through = scan.synced_through.max(header.synced_through);
        position += header.disk_len().max(BLOCK);
        written_end = position;
    }
    // A damaged payload in a chunk that was synced is corruption: keep the record
    // so reads report it. In a chunk never synced it is a torn write: drop it, and
    // with it its batch.
    let synced = scan.synced_through;
    let mut kept = scan.records.split_off(first_new);
    kept.retain(|record| record.intact || record.sequence <= synced);
    scan.records.extend(kept);
    Ok(written_end as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spans inside, across and past the window's edges read what the file
    /// holds, as a whole read of the file would.
    #[test]
    fn the_scan_window_reads_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        let len = 2 * SCAN_WINDOW + 12_345;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let contents: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        fs::write(&path, &contents).unwrap();
        let mut window = SegmentWindow::open(&path).unwrap();
        assert_eq!(window.file_len, len);
        let spans = [
            (0, 4096),
            (4096, 100),
            (SCAN_WINDOW - 10, 4096),
            (SCAN_WINDOW + 5, SCAN_WINDOW + 1000),
            (10, 64),
            (len - 100, 4096),
            (len, 10),
            (3 * SCAN_WINDOW, 10),
        ];
        for (position, want) in spans {
            let got = window.bytes(position, want).unwrap().to_vec();
            let end = (position + want).min(len);
            let expected = contents.get(position..end).unwrap_or(&[]);
            assert_eq!(got, expected, "{want} bytes at {position}");
        }
    }
}
