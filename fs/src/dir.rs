//! Directory contents: entries kept in the directory's data sectors.
//!
//! Each data sector of a directory is one *block* of up to [`SLOTS_PER_BLOCK`]
//! entries. An entry never moves once placed, so its *cookie* (block × slots +
//! slot) is a stable `readdir` offset under concurrent creates and unlinks, and a
//! create or unlink rewrites one block, not the whole directory.
//!
//! Block format, inside the (sealed) sector plaintext:
//! `[version 1][payload length u16 LE][postcard Vec<EntryRepr>][zero padding]`.

use crate::attr::FileKind;
use crate::error::{FsError, FsResult};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The data sector size of directories.
pub const DIR_SECTOR_SIZE: u32 = 4096;
/// Entries one block holds at most.
pub const SLOTS_PER_BLOCK: u64 = 64;
/// Longest name, in bytes.
pub const NAME_MAX: usize = 255;

const BLOCK_VERSION: u8 = 1;
const BLOCK_HEADER: usize = 3;
/// Postcard's worst case around a name: slot, kind, inode varint, length varint,
/// plus the entry vector's own length prefix amortized.
const ENTRY_OVERHEAD: usize = 16;
const BLOCK_BUDGET: usize = DIR_SECTOR_SIZE as usize - BLOCK_HEADER - 4;

#[derive(Serialize, Deserialize)]
struct EntryRepr {
    slot: u8,
    kind: u8,
    inode: u64,
    name: serde_bytes::ByteBuf,
}

/// What a name in a directory points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The inode of the named file.
    pub inode: u64,
    /// Its type, so `readdir` needs no lookup.
    pub kind: FileKind,
}

#[derive(Clone, Default)]
struct BlockState {
    used_bytes: usize,
    used_slots: u64,
}

/// A directory's entries in memory, with the blocks changed since the last
/// [`Directory::take_dirty`].
#[derive(Clone, Default)]
pub struct Directory {
    names: HashMap<Vec<u8>, u64>,
    by_cookie: BTreeMap<u64, (Vec<u8>, Entry)>,
    blocks: Vec<BlockState>,
    /// No block before this one has a free slot (a search hint).
    first_free: usize,
    dirty: BTreeSet<u64>,
}

fn entry_cost(name: &[u8]) -> usize {
    ENTRY_OVERHEAD + name.len()
}

/// Checks a name for a directory entry.
pub fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid(format!(
            "{:?} is not a valid file name",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Directory {
        Directory::default()
    }

    /// Decodes a directory from its block plaintexts, in order.
    pub fn from_blocks(blocks: &[Vec<u8>]) -> FsResult<Directory> {
        let mut dir = Directory::new();
        for (index, bytes) in blocks.iter().enumerate() {
            if bytes.len() != DIR_SECTOR_SIZE as usize {
                return Err(FsError::Io(format!(
                    "directory block {index} is {} bytes, not {DIR_SECTOR_SIZE}",
                    bytes.len()
                )));
            }
            dir.blocks.push(BlockState::default());
            if bytes.iter().all(|&byte| byte == 0) {
                continue;
            }
            let entries = decode_block(bytes)
                .map_err(|why| FsError::Io(format!("directory block {index}: {why}")))?;
            for entry in entries {
                let kind = FileKind::from_byte(entry.kind).ok_or_else(|| {
                    FsError::Io(format!("directory block {index}: bad entry type"))
                })?;
                let slot = u64::from(entry.slot);
                if slot >= SLOTS_PER_BLOCK || check_name(&entry.name).is_err() {
                    return Err(FsError::Io(format!("directory block {index}: bad entry")));
                }
                let state = &mut dir.blocks[index];
                if state.used_slots & (1 << slot) != 0 {
                    return Err(FsError::Io(format!("directory block {index}: slot reused")));
                }
                state.used_slots |= 1 << slot;
                state.used_bytes += entry_cost(&entry.name);
                // The cost bounds the encoded size from above, so a block within
                // the budget always encodes again, whatever replaces its entries.
                if state.used_bytes > BLOCK_BUDGET {
                    return Err(FsError::Io(format!("directory block {index} is over-full")));
                }
                let cookie = index as u64 * SLOTS_PER_BLOCK + slot;
                let name = entry.name.into_vec();
                if dir.names.insert(name.clone(), cookie).is_some() {
                    return Err(FsError::Io(format!(
                        "directory block {index}: duplicate name"
                    )));
                }
                dir.by_cookie.insert(
                    cookie,
                    (
                        name,
                        Entry {
                            inode: entry.inode,
                            kind,
                        },
                    ),
                );
            }
        }
        Ok(dir)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True if the directory has no entries.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Number of blocks (data sectors).
    pub fn block_count(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// The entry named `name`.
    pub fn get(&self, name: &[u8]) -> Option<Entry> {
        let cookie = self.names.get(name)?;
        self.by_cookie.get(cookie).map(|(_, entry)| *entry)
    }

    /// Adds `name`, which must not exist; returns its cookie.
    pub fn insert(&mut self, name: &[u8], entry: Entry) -> u64 {
        let cost = entry_cost(name);
        let mut index = self.first_free;
        loop {
            if index == self.blocks.len() {
                self.blocks.push(BlockState::default());
            }
            let state = &mut self.blocks[index];
            if state.used_slots != u64::MAX && state.used_bytes + cost <= BLOCK_BUDGET {
                let slot = u64::from(state.used_slots.trailing_ones());
                state.used_slots |= 1 << slot;
                state.used_bytes += cost;
                let cookie = index as u64 * SLOTS_PER_BLOCK + slot;
                self.names.insert(name.to_vec(), cookie);
                self.by_cookie.insert(cookie, (name.to_vec(), entry));
                self.dirty.insert(index as u64);
                if state.used_slots == u64::MAX && index == self.first_free {
                    self.first_free += 1;
                }
                return cookie;
            }
            if index == self.first_free && state.used_slots == u64::MAX {
                self.first_free += 1;
            }
            index += 1;
        }
    }

    /// Points an existing `name` at `entry`, keeping its cookie.
    pub fn replace(&mut self, name: &[u8], entry: Entry) -> bool {
        let Some(cookie) = self.names.get(name) else {
            return false;
        };
        if let Some(slot) = self.by_cookie.get_mut(cookie) {
            slot.1 = entry;
        }
        self.dirty.insert(cookie / SLOTS_PER_BLOCK);
        true
    }

    /// Removes `name`; returns what it pointed to.
    pub fn remove(&mut self, name: &[u8]) -> Option<Entry> {
        let cookie = self.names.remove(name)?;
        let (_, entry) = self.by_cookie.remove(&cookie)?;
        let index = (cookie / SLOTS_PER_BLOCK) as usize;
        if let Some(state) = self.blocks.get_mut(index) {
            state.used_slots &= !(1 << (cookie % SLOTS_PER_BLOCK));
            state.used_bytes = state.used_bytes.saturating_sub(entry_cost(name));
        }
        self.first_free = self.first_free.min(index);
        self.dirty.insert(index as u64);
        Some(entry)
    }

    /// Entries with cookies at or after `cookie`, in cookie order.
    pub fn entries_from(&self, cookie: u64) -> impl Iterator<Item = (u64, &[u8], Entry)> {
        self.by_cookie
            .range(cookie..)
            .map(|(cookie, (name, entry))| (*cookie, name.as_slice(), *entry))
    }

    /// The plaintexts of the blocks changed since the last call, and the block
    /// count; empty trailing blocks are dropped so the directory shrinks.
    pub fn take_dirty(&mut self) -> (Vec<(u64, Vec<u8>)>, u64) {
        while self
            .blocks
            .last()
            .is_some_and(|state| state.used_slots == 0)
        {
            self.blocks.pop();
        }
        self.first_free = self.first_free.min(self.blocks.len());
        let count = self.block_count();
        let dirty = std::mem::take(&mut self.dirty);
        let blocks = dirty
            .into_iter()
            .filter(|&index| index < count)
            .map(|index| (index, self.encode_block(index)))
            .collect();
        (blocks, count)
    }

    /// True if blocks changed since the last [`Directory::take_dirty`].
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    fn encode_block(&self, index: u64) -> Vec<u8> {
        let first = index * SLOTS_PER_BLOCK;
        let entries: Vec<EntryRepr> = self
            .by_cookie
            .range(first..first + SLOTS_PER_BLOCK)
            .map(|(cookie, (name, entry))| EntryRepr {
                slot: (cookie % SLOTS_PER_BLOCK) as u8,
                kind: entry.kind.to_byte(),
                inode: entry.inode,
                name: serde_bytes::ByteBuf::from(name.clone()),
            })
            .collect();
        let mut block = vec![0u8; DIR_SECTOR_SIZE as usize];
        block[0] = BLOCK_VERSION;
        // Insertion keeps every block within BLOCK_BUDGET, so this fits.
        let used = match postcard::to_slice(&entries, &mut block[BLOCK_HEADER..]) {
            Ok(written) => written.len(),
            Err(error) => unreachable!("directory block overflow: {error}"),
        };
        block[1..3].copy_from_slice(&(used as u16).to_le_bytes());
        block
    }
}

fn decode_block(bytes: &[u8]) -> Result<Vec<EntryRepr>, String> {
    if bytes.len() < BLOCK_HEADER {
        return Err("shorter than its header".into());
    }
    if bytes[0] != BLOCK_VERSION {
        return Err(format!("unknown block version {}", bytes[0]));
    }
    let len = usize::from(u16::from_le_bytes([bytes[1], bytes[2]]));
    let payload = bytes
        .get(BLOCK_HEADER..BLOCK_HEADER + len)
        .ok_or("payload length past the end")?;
    let (entries, rest): (Vec<EntryRepr>, &[u8]) =
        postcard::take_from_bytes(payload).map_err(|error| error.to_string())?;
    if !rest.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(inode: u64) -> Entry {
        Entry {
            inode,
            kind: FileKind::Regular,
        }
    }

    #[test]
    fn entries_survive_encoding_and_keep_their_cookies() {
        let mut dir = Directory::new();
        let mut cookies = HashMap::new();
        for i in 0..500u64 {
            let name = format!("file-{i:04}-{}", "x".repeat((i % 200) as usize));
            cookies.insert(name.clone(), dir.insert(name.as_bytes(), file(i + 10)));
        }
        for i in (0..500u64).step_by(3) {
            let name = format!("file-{i:04}-{}", "x".repeat((i % 200) as usize));
            assert_eq!(dir.remove(name.as_bytes()), Some(file(i + 10)));
            cookies.remove(&name);
        }
        let (blocks, count) = dir.take_dirty();
        let mut plaintexts = vec![vec![0u8; DIR_SECTOR_SIZE as usize]; count as usize];
        for (index, bytes) in blocks {
            plaintexts[index as usize] = bytes;
        }
        let decoded = Directory::from_blocks(&plaintexts).unwrap();
        assert_eq!(decoded.len(), cookies.len());
        for (cookie, name, _) in decoded.entries_from(0) {
            assert_eq!(
                cookies.get(std::str::from_utf8(name).unwrap()),
                Some(&cookie)
            );
        }
    }

    #[test]
    fn freed_slots_are_reused_and_empty_tail_blocks_dropped() {
        let mut dir = Directory::new();
        for i in 0..130u64 {
            dir.insert(format!("{i}").as_bytes(), file(i));
        }
        assert_eq!(dir.block_count(), 3);
        for i in 64..130u64 {
            dir.remove(format!("{i}").as_bytes());
        }
        let (_, count) = dir.take_dirty();
        assert_eq!(count, 1);
        dir.remove(b"3");
        assert_eq!(dir.insert(b"new", file(1)), 3);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name(b"ok").is_ok());
        assert!(check_name(b"a/b").is_err());
        assert!(check_name(b"..").is_err());
        assert!(matches!(
            check_name(&[b'a'; 256]),
            Err(FsError::NameTooLong)
        ));
    }

    fn decodes(bytes: &[u8]) -> bool {
        Directory::from_blocks(&[bytes.to_vec()]).is_ok()
    }

    #[test]
    fn garbage_blocks_are_errors() {
        let block = |head: &[u8]| {
            let mut block = head.to_vec();
            block.resize(DIR_SECTOR_SIZE as usize, 0);
            block
        };
        assert!(!decodes(&block(&[1, 200, 0, 1, 2])));
        assert!(!decodes(&block(&[9, 0, 0])));
        assert!(decodes(&block(&[])));
        assert!(!decodes(&[0; 16]));
    }
}
