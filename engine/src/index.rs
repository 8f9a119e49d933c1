//! A shard's in-memory index: on-disk key → where the latest record lives.
//!
//! Memory is the constraint (≤ 48 bytes per live sector): an entry is the 16-byte
//! key and a 10-byte packed location, with no per-entry allocation, in a
//! SwissTable. Keys are uniformly distributed salted hashes, so the hasher just
//! takes eight of their bytes.

use hashbrown::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::record::{Key, RECORD_ALIGN};

/// Where a record lives: segment, byte offset of its header, payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Loc {
    /// Segment number (< 2^16).
    pub segment: u32,
    /// Byte offset of the record header in the segment (a multiple of 16, < 2^36).
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

/// Bytes of a packed [`Loc`].
pub(crate) const PACKED_LOC_LEN: usize = 10;

/// The largest segment number an index entry can hold.
pub(crate) const MAX_SEGMENT: u32 = u16::MAX as u32;

impl Loc {
    fn pack(self) -> [u8; 10] {
        let mut packed = [0u8; 10];
        packed[..2].copy_from_slice(&(self.segment as u16).to_le_bytes());
        packed[2..6].copy_from_slice(&((self.offset / RECORD_ALIGN as u64) as u32).to_le_bytes());
        packed[6..].copy_from_slice(&self.len.to_le_bytes());
        packed
    }

    fn unpack(packed: &[u8; 10]) -> Loc {
        Loc {
            segment: u16::from_le_bytes([packed[0], packed[1]]) as u32,
            offset: u32::from_le_bytes([packed[2], packed[3], packed[4], packed[5]]) as u64
                * RECORD_ALIGN as u64,
            len: u32::from_le_bytes([packed[6], packed[7], packed[8], packed[9]]),
        }
    }
}

/// Hashes a key by taking its first eight bytes: keys are already uniform.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for (index, byte) in bytes.iter().take(8).enumerate() {
            self.0 ^= (*byte as u64) << (index * 8);
        }
    }

    fn write_usize(&mut self, _length_prefix: usize) {}
}

/// Key → location of the newest record.
#[derive(Default, Clone)]
pub(crate) struct Index {
    map: HashMap<Key, [u8; 10], BuildHasherDefault<KeyHasher>>,
}

impl Index {
    /// An empty index with room for `entries`.
    pub fn with_capacity(entries: usize) -> Index {
        Index {
            map: HashMap::with_capacity_and_hasher(entries, BuildHasherDefault::default()),
        }
    }

    /// Inserts an entry straight from its packed form (checkpoint loading).
    pub fn insert_packed(&mut self, key: Key, packed: [u8; PACKED_LOC_LEN]) {
        self.map.insert(key, packed);
    }

    /// Visits every entry in its packed form (checkpoint writing).
    pub fn for_each_packed(&self, mut visit: impl FnMut(&Key, &[u8; PACKED_LOC_LEN])) {
        for (key, packed) in &self.map {
            visit(key, packed);
        }
    }

    /// Every (key, location), for compaction.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, Loc)> {
        self.map
            .iter()
            .map(|(key, packed)| (key, Loc::unpack(packed)))
    }

    pub fn get(&self, key: &Key) -> Option<Loc> {
        self.map.get(key).map(Loc::unpack)
    }

    /// Points `key` at `loc`; returns where it pointed before.
    pub fn insert(&mut self, key: Key, loc: Loc) -> Option<Loc> {
        self.map
            .insert(key, loc.pack())
            .map(|old| Loc::unpack(&old))
    }

    pub fn remove(&mut self, key: &Key) -> Option<Loc> {
        self.map.remove(key).map(|old| Loc::unpack(&old))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Heap bytes held by the table.
    pub fn heap_bytes(&self) -> usize {
        self.map.allocation_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_locations() {
        let loc = Loc {
            segment: 65_535,
            offset: (u32::MAX as u64) * 16,
            len: 1 << 20,
        };
        assert_eq!(Loc::unpack(&loc.pack()), loc);
        let mut index = Index::default();
        assert_eq!(index.insert([1; 16], loc), None);
        assert_eq!(index.get(&[1; 16]), Some(loc));
        assert_eq!(index.remove(&[1; 16]), Some(loc));
        assert_eq!(index.len(), 0);
    }
}
