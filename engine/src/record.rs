//! The on-disk format of a shard's log: chunks of records.
//!
//! A shard appends one *chunk* per group commit, starting at a 4 KiB boundary so it
//! can be written with O_DIRECT:
//!
//! ```text
//! chunk  = header (64 B) · record* · zero padding to 4 KiB
//! header = magic "BTC1" · version · pad 3 · sequence u64 · body_len u32 ·
//!          record_count u32 · crc32c(header with crc = 0) u32 · synced_through u64 ·
//!          log_id u64 · pad 20
//! record = header (48 B) · payload · zero padding to 16 B
//! header = key [16] · payload_len u32 · kind u8 · pad 3 · batch u64 ·
//!          part_len u32 · shards u32 · crc32c(header bytes 0..40) u32 · crc32c(payload) u32
//! ```
//!
//! Every field is little-endian. The record's key is the salted hash of its
//! sector id, so nothing on disk names a file or a sector index. A record carries
//! its batch id, how many records of the batch this shard holds (`part_len`) and
//! which shards hold parts (`shards`), so recovery can tell a complete batch from
//! one cut short by a crash.
//!
//! The header and the payload have separate checksums, and each chunk says up to
//! which chunk sequence the shard had synced (`synced_through`) when it was built.
//! So recovery can tell a *torn* record (in a chunk that was never synced: the
//! write never reached disk whole, and the batch is dropped) from a *corrupt* one
//! (in a synced chunk, whose header still names its key: the sector is then
//! refused on read, never served, and never silently replaced by an older version).
//!
//! `log_id` is a secret of the store (derived from its salt). Recovery accepts
//! only chunk headers that carry it, so sector data that happens to, or is made
//! to, look like a chunk header is never mistaken for one when recovery steps
//! block by block past damage or through a reused segment.

use thiserror::Error;

/// Alignment of chunks on disk (O_DIRECT's unit on every device we target).
pub const BLOCK: usize = 4096;
/// Alignment of records inside a chunk; index offsets count in these units.
pub const RECORD_ALIGN: usize = 16;
/// Size of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 64;
/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 48;
/// The largest payload a record may carry (a sealed 1 MiB sector fits).
pub const MAX_PAYLOAD: usize = (1 << 20) + 4096;
/// The most shards a record's `shards` mask can name.
pub const MAX_SHARDS: usize = 32;

const CHUNK_MAGIC: [u8; 4] = *b"BTC1";
const VERSION: u8 = 1;

/// The salted, hashed name of a sector on disk.
pub type Key = [u8; 16];

/// What a record does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Stores the payload as the sector's contents.
    Put,
    /// Removes the sector.
    Delete,
}

/// Why bytes are not a valid chunk or record.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the structure needs.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Not a chunk header (unwritten space, or garbage).
    #[error("no chunk magic")]
    NoMagic,
    /// A format version this build does not read.
    #[error("unsupported chunk version {0}")]
    Version(u8),
    /// A checksum mismatch: torn write or corruption.
    #[error("checksum mismatch")]
    Checksum,
    /// A field outside its range.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub const fn align_up(value: usize, align: usize) -> usize {
    (value + align - 1) & !(align - 1)
}

/// The bytes a record with `payload_len` bytes of payload occupies in a chunk.
pub const fn record_footprint(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + align_up(payload_len, RECORD_ALIGN)
}

/// A parsed chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Monotonic per shard: recovery replays chunks in this order.
    pub sequence: u64,
    /// Bytes of records after the header.
    pub body_len: u32,
    /// Records in the body.
    pub record_count: u32,
    /// Every chunk up to this sequence was durable when this one was built.
    pub synced_through: u64,
    /// The store's log id; chunks of another store or forged ones lack it.
    pub log_id: u64,
}

impl ChunkHeader {
    /// Bytes the chunk occupies on disk, header and padding included.
    pub fn disk_len(&self) -> usize {
        align_up(CHUNK_HEADER_LEN + self.body_len as usize, BLOCK)
    }

    /// Parses and checks a chunk header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<ChunkHeader, RecordError> {
        if bytes.len() < CHUNK_HEADER_LEN {
            return Err(RecordError::Truncated {
                need: CHUNK_HEADER_LEN,
                have: bytes.len(),
            });
        }
        let header = &bytes[..CHUNK_HEADER_LEN];
        if header[..4] != CHUNK_MAGIC {
            return Err(RecordError::NoMagic);
        }
        if header[4] != VERSION {
            return Err(RecordError::Version(header[4]));
        }
        let mut zeroed = [0u8; CHUNK_HEADER_LEN];
        zeroed.copy_from_slice(header);
        zeroed[24..28].fill(0);
        if crc32c::crc32c(&zeroed) != le_u32(header, 24) {
            return Err(RecordError::Checksum);
        }
        let parsed = ChunkHeader {
            sequence: le_u64(header, 8),
            body_len: le_u32(header, 16),
            record_count: le_u32(header, 20),
            synced_through: le_u64(header, 28),
            log_id: le_u64(header, 36),
        };
        if parsed.body_len as usize > (MAX_PAYLOAD + RECORD_HEADER_LEN) * 1024 {
            return Err(RecordError::Invalid("chunk body length"));
        }
        Ok(parsed)
    }

    fn write(&self, out: &mut [u8]) {
        out[..CHUNK_HEADER_LEN].fill(0);
        out[..4].copy_from_slice(&CHUNK_MAGIC);
        out[4] = VERSION;
        out[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        out[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.record_count.to_le_bytes());
        out[28..36].copy_from_slice(&self.synced_through.to_le_bytes());
        out[36..44].copy_from_slice(&self.log_id.to_le_bytes());
        let crc = crc32c::crc32c(&out[..CHUNK_HEADER_LEN]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A parsed record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// The sector's on-disk key.
    pub key: Key,
    /// Payload bytes.
    pub payload_len: u32,
    /// Put or delete.
    pub kind: RecordKind,
    /// The write batch the record belongs to.
    pub batch: u64,
    /// How many records of the batch this shard holds.
    pub part_len: u32,
    /// Bit `s` set when shard `s` holds part of the batch.
    pub shards: u32,
}

impl RecordHeader {
    /// The bytes this record occupies in a chunk.
    pub fn footprint(&self) -> usize {
        record_footprint(self.payload_len as usize)
    }

    fn write(&self, out: &mut [u8], payload: &[u8]) {
        let header = &mut out[..RECORD_HEADER_LEN];
        header.fill(0);
        header[..16].copy_from_slice(&self.key);
        header[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        header[20] = match self.kind {
            RecordKind::Put => 0,
            RecordKind::Delete => 1,
        };
        header[24..32].copy_from_slice(&self.batch.to_le_bytes());
        header[32..36].copy_from_slice(&self.part_len.to_le_bytes());
        header[36..40].copy_from_slice(&self.shards.to_le_bytes());
        let header_crc = crc32c::crc32c(&header[..40]);
        header[40..44].copy_from_slice(&header_crc.to_le_bytes());
        header[44..48].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    }
}

/// A record whose header checked out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedRecord<'a> {
    /// The header.
    pub header: RecordHeader,
    /// The payload bytes as stored.
    pub payload: &'a [u8],
    /// False when the payload fails its checksum: the record must not be served.
    pub payload_intact: bool,
}

/// Parses the record at the start of `bytes`: checks the header's checksum and
/// reports whether the payload's holds.
pub fn parse_record(bytes: &[u8]) -> Result<ParsedRecord<'_>, RecordError> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(RecordError::Truncated {
            need: RECORD_HEADER_LEN,
            have: bytes.len(),
        });
    }
    let header = &bytes[..RECORD_HEADER_LEN];
    if crc32c::crc32c(&header[..40]) != le_u32(header, 40) {
        return Err(RecordError::Checksum);
    }
    let payload_len = le_u32(header, 16) as usize;
    if payload_len > MAX_PAYLOAD {
        return Err(RecordError::Invalid("payload length"));
    }
    let need = RECORD_HEADER_LEN + payload_len;
    if bytes.len() < need {
        return Err(RecordError::Truncated {
            need,
            have: bytes.len(),
        });
    }
    let kind = match header[20] {
        0 => RecordKind::Put,
        1 => RecordKind::Delete,
        _ => return Err(RecordError::Invalid("record kind")),
    };
    let payload = &bytes[RECORD_HEADER_LEN..need];
    let mut key = [0u8; 16];
    key.copy_from_slice(&header[..16]);
    Ok(ParsedRecord {
        header: RecordHeader {
            key,
            payload_len: payload_len as u32,
            kind,
            batch: le_u64(header, 24),
            part_len: le_u32(header, 32),
            shards: le_u32(header, 36),
        },
        payload,
        payload_intact: crc32c::crc32c(payload) == le_u32(header, 44),
    })
}

/// One record of a parsed chunk: its offset in the chunk and, if it checks out,
/// its header and payload.
pub type ChunkEntry<'a> = (usize, Result<ParsedRecord<'a>, RecordError>);

/// Walks the records of the chunk at the start of `bytes`. A record whose header
/// fails its checksum is yielded as an error and ends the walk, since nothing
/// after it can be located.
pub fn parse_chunk(bytes: &[u8]) -> Result<(ChunkHeader, Vec<ChunkEntry<'_>>), RecordError> {
    let header = ChunkHeader::parse(bytes)?;
    let end = CHUNK_HEADER_LEN + header.body_len as usize;
    if bytes.len() < end {
        return Err(RecordError::Truncated {
            need: end,
            have: bytes.len(),
        });
    }
    let mut entries = Vec::new();
    let mut offset = CHUNK_HEADER_LEN;
    for _ in 0..header.record_count {
        if offset + RECORD_HEADER_LEN > end {
            entries.push((offset, Err(RecordError::Invalid("record past chunk end"))));
            break;
        }
        let parsed = parse_record(&bytes[offset..end]);
        let next = parsed
            .as_ref()
            .ok()
            .map(|record| offset + record.header.footprint());
        entries.push((offset, parsed));
        match next {
            Some(next) if next <= end => offset = next,
            _ => break,
        }
    }
    Ok((header, entries))
}

/// Builds one chunk in a caller-owned, block-aligned buffer.
pub struct ChunkBuilder<'a> {
    buffer: &'a mut [u8],
    used: usize,
    records: u32,
}

impl<'a> ChunkBuilder<'a> {
    /// Starts a chunk at the beginning of `buffer`.
    pub fn new(buffer: &'a mut [u8]) -> ChunkBuilder<'a> {
        ChunkBuilder {
            buffer,
            used: CHUNK_HEADER_LEN,
            records: 0,
        }
    }

    /// Continues a chunk of which `used` bytes (header included) and `records`
    /// records were already built in `buffer`.
    pub fn resume(buffer: &'a mut [u8], used: usize, records: u32) -> ChunkBuilder<'a> {
        ChunkBuilder {
            buffer,
            used: used.max(CHUNK_HEADER_LEN),
            records,
        }
    }

    /// Bytes used so far, header included.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Records added so far.
    pub fn records(&self) -> u32 {
        self.records
    }

    /// True if no record was added.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Whether a record of `payload_len` bytes still fits.
    pub fn fits(&self, payload_len: usize) -> bool {
        align_up(self.used + record_footprint(payload_len), BLOCK) <= self.buffer.len()
    }

    /// Appends a record; returns its offset in the chunk, or `None` if it does not fit.
    pub fn push(&mut self, header: &RecordHeader, payload: &[u8]) -> Option<usize> {
        debug_assert_eq!(header.payload_len as usize, payload.len());
        if !self.fits(payload.len()) {
            return None;
        }
        let offset = self.used;
        let footprint = header.footprint();
        let slot = &mut self.buffer[offset..offset + footprint];
        header.write(slot, payload);
        slot[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload.len()].copy_from_slice(payload);
        slot[RECORD_HEADER_LEN + payload.len()..].fill(0);
        self.used += footprint;
        self.records += 1;
        Some(offset)
    }

    /// Writes the header and zero padding; returns the bytes to write (a multiple
    /// of [`BLOCK`]).
    pub fn finish(self, sequence: u64, synced_through: u64, log_id: u64) -> usize {
        let body_len = (self.used - CHUNK_HEADER_LEN) as u32;
        ChunkHeader {
            sequence,
            body_len,
            record_count: self.records,
            synced_through,
            log_id,
        }
        .write(self.buffer);
        let disk_len = align_up(self.used, BLOCK);
        self.buffer[self.used..disk_len].fill(0);
        disk_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(key: u8, payload: &[u8]) -> RecordHeader {
        RecordHeader {
            key: [key; 16],
            payload_len: payload.len() as u32,
            kind: RecordKind::Put,
            batch: 7,
            part_len: 2,
            shards: 0b11,
        }
    }

    #[test]
    fn chunk_round_trip_and_corruption() {
        let mut buffer = vec![0u8; 4 * BLOCK];
        let mut builder = ChunkBuilder::new(&mut buffer);
        let a = builder.push(&header(1, b"hello"), b"hello").unwrap();
        let b = builder
            .push(&header(2, &[9u8; 5000]), &[9u8; 5000])
            .unwrap();
        let len = builder.finish(42, 41, 7);
        assert_eq!(len % BLOCK, 0);
        let (chunk, entries) = parse_chunk(&buffer[..len]).unwrap();
        assert_eq!(chunk.sequence, 42);
        assert_eq!(chunk.disk_len(), len);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, a);
        assert_eq!(entries[1].0, b);
        assert_eq!(chunk.synced_through, 41);
        assert_eq!(chunk.log_id, 7);
        let record = entries[1].1.clone().unwrap();
        assert_eq!(record.header, header(2, &[9u8; 5000]));
        assert_eq!(record.payload, &[9u8; 5000][..]);
        assert!(record.payload_intact);

        // A flipped payload byte marks that payload only; the key is still known.
        buffer[a + RECORD_HEADER_LEN] ^= 1;
        let (_, entries) = parse_chunk(&buffer[..len]).unwrap();
        let record = entries[0].1.clone().unwrap();
        assert_eq!(record.header.key, [1; 16]);
        assert!(!record.payload_intact);
        assert!(entries[1].1.as_ref().unwrap().payload_intact);

        // A flipped record-header byte makes the record unreadable.
        buffer[a + 2] ^= 1;
        let (_, entries) = parse_chunk(&buffer[..len]).unwrap();
        assert_eq!(entries[0].1, Err(RecordError::Checksum));

        // A flipped header byte fails the chunk.
        buffer[9] ^= 1;
        assert_eq!(ChunkHeader::parse(&buffer), Err(RecordError::Checksum));
        assert_eq!(ChunkHeader::parse(&[0u8; 64]), Err(RecordError::NoMagic));
    }

    #[test]
    fn refuses_records_that_do_not_fit() {
        let mut buffer = vec![0u8; BLOCK];
        let mut builder = ChunkBuilder::new(&mut buffer);
        assert!(builder.push(&header(1, &[0; 5000]), &[0; 5000]).is_none());
        assert!(builder.push(&header(1, &[0; 100]), &[0; 100]).is_some());
    }
}
