//! Compaction: moving the live records out of mostly dead segments, online, with
//! a bounded share of the shard's writes, then deleting the segments.
//!
//! A segment is a victim when less than half of what was written into it is
//! still live. A victim with nothing live costs nothing to reclaim and is taken at
//! once; copying the live records out of a partly dead one costs a write for each,
//! so that waits until the shard's segments holding anything live hold more than
//! [`MAX_AMPLIFICATION`] times its live bytes, or until a write found no room.
//! Records overwritten soon after they were written (a sequential rewrite, a journal) then die in place
//! instead of being copied first: log-structured cleaning's cost-benefit rule. A segment may be compacted only once a committed checkpoint lies after it:
//! recovery then never needs to scan it, and every record it still holds that
//! matters is either in that checkpoint's index or superseded by the log tail.
//! Moved records are appended like any write (as standalone batch 0, which
//! recovery treats as complete) and apply only if their key still points at the
//! old place. Keys with a write in flight are left alone, so that for every key
//! the log order is the order writes were applied. A victim is deleted only once
//! the chunks holding its moved records are synced.
//!
//! Emptied segments are kept (a few per shard) and reused for new segments:
//! writing into blocks that were written before is an overwrite for the file
//! system, much cheaper than a first write into freshly allocated space.
//!
//! The budget: compaction may append half as many bytes as users wrote (at most
//! a third of the shard's write traffic), plus a step's worth each idle tick.

use std::collections::{BTreeSet, VecDeque};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use super::{BatchPart, Shard};
use crate::index::Loc;
use crate::record::{self, BLOCK, Key, RECORD_HEADER_LEN, align_up};
use crate::uring::AlignedBuf;

/// How long an idle shard with compaction work waits for requests.
pub(super) const IDLE_TICK: Duration = Duration::from_millis(20);
/// Emptied segment files kept per shard for reuse.
const MAX_SPARES: usize = 4;
/// The most bytes one step moves.
const STEP_BYTES: i64 = 1 << 20;
/// How much of a victim one read brings in.
const WINDOW_BYTES: usize = 1 << 20;
/// Segment bytes per live byte below which partly dead segments are left alone.
const MAX_AMPLIFICATION: u64 = 2;
/// Compaction credit per byte users write.
const SHARE_NUMERATOR: i64 = 1;
const SHARE_DENOMINATOR: i64 = 2;

#[derive(Default)]
pub(super) struct Compaction {
    /// Segments numbered below this are covered by a committed checkpoint.
    pub compactable_below: u32,
    credit: i64,
    victim: Option<Victim>,
    /// Emptied segments, deletable once the shard has synced this sequence.
    awaiting_sync: Vec<(u32, u64)>,
    /// Segments holding a corrupt live record: never picked again.
    stuck: BTreeSet<u32>,
    /// Bytes moved so far, for statistics.
    pub moved_bytes: u64,
    /// The last stretch of a victim read: (segment, offset, bytes).
    window: Option<(u32, u64, AlignedBuf)>,
    /// A write found no room since a segment was last reclaimed: copy out of
    /// partly dead segments whatever the amplification.
    pub space_pressure: bool,
}

struct Victim {
    id: u32,
    entries: VecDeque<(Key, Loc)>,
}

impl Victim {
    /// A victim whose live records are visited in the order they lie on disk.
    fn new(id: u32, mut entries: Vec<(Key, Loc)>) -> Victim {
        entries.sort_unstable_by_key(|(_, loc)| loc.offset);
        Victim {
            id,
            entries: entries.into(),
        }
    }
}

impl Compaction {
    pub fn credit_user_write(&mut self, bytes: usize) {
        self.credit =
            (self.credit + bytes as i64 * SHARE_NUMERATOR / SHARE_DENOMINATOR).min(4 * STEP_BYTES);
    }

    pub fn credit_idle(&mut self) {
        self.credit = (self.credit + STEP_BYTES).min(4 * STEP_BYTES);
    }
}

impl Shard {
    /// Whether partly dead segments may be compacted now (see the module docs).
    fn copying_allowed(&self) -> bool {
        if self.compaction.space_pressure {
            return true;
        }
        // Segments with nothing live are left out: wholly dead ones cost no copy
        // and go as soon as a checkpoint covers them, and ones whose writes are
        // still in flight are not dead at all. Neither says anything about
        // fragmentation; counted, a sequential rewrite crosses the limit and
        // copies records about to die (a third of its write bandwidth).
        let (written, live) = self
            .segments
            .values()
            .filter(|s| s.live_bytes > 0)
            .fold((0u64, 0u64), |(w, l), s| (w + s.written, l + s.live_bytes));
        written > live.saturating_mul(MAX_AMPLIFICATION)
    }

    fn pick_victim(&self) -> Option<u32> {
        let copying = self.copying_allowed();
        self.segments
            .values()
            .filter(|segment| {
                segment.id < self.compaction.compactable_below
                    && Some(segment.id) != self.active
                    && !self.compaction.stuck.contains(&segment.id)
                    && !self
                        .compaction
                        .awaiting_sync
                        .iter()
                        .any(|(id, _)| *id == segment.id)
                    && segment.written > 0
                    && segment.live_bytes * 2 < segment.written
                    && (segment.live_bytes == 0 || copying)
            })
            .min_by_key(|segment| segment.live_bytes * 1000 / segment.written)
            .map(|segment| segment.id)
    }

    /// Segment `id` as a victim: the live records the index has in it.
    fn victim(&self, id: u32) -> Victim {
        let entries = self
            .view
            .index()
            .iter()
            .filter(|(_, loc)| loc.segment == id)
            .map(|(key, loc)| (*key, loc))
            .collect();
        Victim::new(id, entries)
    }

    /// True when there is compaction work that idle time should advance.
    pub(super) fn compaction_pending(&self) -> bool {
        self.compaction.victim.is_some()
            || !self.compaction.awaiting_sync.is_empty()
            || self.pick_victim().is_some()
    }

    /// Moves up to a step's worth of live records out of the current victim.
    pub(super) fn compact_step(&mut self) {
        self.delete_synced_victims();
        if self.checkpoint.is_some() || self.compaction.credit <= 0 {
            return;
        }
        if self.compaction.victim.is_none() {
            let Some(id) = self.pick_victim() else {
                return;
            };
            self.compaction.victim = Some(self.victim(id));
        }
        let mut budget = self.compaction.credit.min(STEP_BYTES);
        while budget > 0 {
            let Some(victim) = self.compaction.victim.as_mut() else {
                return;
            };
            let Some((key, loc)) = victim.entries.pop_front() else {
                break;
            };
            let id = victim.id;
            if self.view.index().get(&key) != Some(loc) || self.pending_keys.contains_key(&key) {
                continue;
            }
            let Some(payload) = self.read_live(&loc) else {
                tracing::warn!(
                    segment = id,
                    "corrupt live record: segment kept, not compacted"
                );
                self.compaction.stuck.insert(id);
                self.compaction.victim = None;
                return;
            };
            let part = BatchPart {
                batch: 0,
                shards: 1 << self.shard_id,
                records: vec![(key, Some(payload.into()))],
                durable: false,
                tracker: None,
                done: Box::new(|_| {}),
            };
            match self.add_part(part) {
                Ok(slot) => {
                    if let Some(Some(part)) = self.parts.get_mut(slot)
                        && let Some(record) = part.records.first_mut()
                    {
                        record.relocates = Some(loc);
                    }
                    budget -= loc.len as i64 + RECORD_HEADER_LEN as i64;
                    self.compaction.credit -= loc.len as i64 + RECORD_HEADER_LEN as i64;
                    self.compaction.moved_bytes += loc.len as u64;
                }
                Err(_) => {
                    if let Some(victim) = self.compaction.victim.as_mut() {
                        victim.entries.push_front((key, loc));
                    }
                    return;
                }
            }
        }
        let Some(victim) = self.compaction.victim.as_ref() else {
            return;
        };
        if !victim.entries.is_empty() {
            return;
        }
        let id = victim.id;
        let still_live = self.segments.get(&id).map_or(0, |s| s.live_bytes);
        let still_pointed_at =
            still_live > 0 && self.view.index().iter().any(|(_, loc)| loc.segment == id);
        if still_pointed_at {
            // Keys that had writes in flight: look again on a later step.
            self.compaction.victim = Some(self.victim(id));
            return;
        }
        // The moved records are in the chunk being built, which will get sequence
        // `next_sequence`, or in chunks already written. Ask for a sync to cover them.
        let last_chunk = self.next_sequence - u64::from(self.building.is_none());
        self.compaction.awaiting_sync.push((id, last_chunk));
        self.sync_waiters.push(Box::new(|_| {}));
        self.compaction.victim = None;
    }

    /// Reads a live record for compaction; `None` if it is corrupt. Records are
    /// visited in offset order and read through a window of [`WINDOW_BYTES`], so
    /// moving a segment costs a few large sequential reads, not one per record.
    fn read_live(&mut self, loc: &Loc) -> Option<Vec<u8>> {
        let segment = self.segments.get(&loc.segment)?;
        let record_end = loc.offset + (RECORD_HEADER_LEN + loc.len as usize) as u64;
        let covered = self
            .compaction
            .window
            .as_ref()
            .is_some_and(|(id, start, buffer)| {
                *id == loc.segment
                    && *start <= loc.offset
                    && record_end <= start + buffer.len() as u64
            });
        if !covered {
            let start = loc.offset & !(BLOCK as u64 - 1);
            let wanted = align_up((record_end - start) as usize, BLOCK).max(WINDOW_BYTES);
            let available = segment.size.saturating_sub(start) as usize;
            let len = wanted.min(align_up(available, BLOCK)).max(BLOCK);
            let mut buffer = AlignedBuf::new(len);
            let readable = len.min(available);
            segment
                .file
                .read_exact_at(&mut buffer.as_mut_slice()[..readable], start)
                .ok()?;
            self.compaction.window = Some((loc.segment, start, buffer));
        }
        let (_, start, buffer) = self.compaction.window.as_ref()?;
        let parsed =
            record::parse_record(buffer.as_slice().get((loc.offset - start) as usize..)?).ok()?;
        parsed.payload_intact.then(|| parsed.payload.to_vec())
    }

    /// Keeps an emptied segment file of at least half a segment for reuse, up to
    /// [`MAX_SPARES`];
    /// deletes the others.
    fn retire(&mut self, segment: crate::segment::Segment) {
        self.view.remove_reader(segment.id);
        let path = crate::segment::segment_path(&self.dir, segment.id);
        let keep = segment.size >= self.config.segment_bytes / 2 && self.spares.len() < MAX_SPARES;
        let outcome = if keep {
            let spare = crate::segment::spare_path(&self.dir, segment.id);
            std::fs::rename(&path, &spare).map(|()| self.spares.push((spare, segment.size)))
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(error) = outcome {
            tracing::warn!(path = %path.display(), %error, "could not retire a compacted segment");
        }
    }

    fn delete_synced_victims(&mut self) {
        let synced = self.synced_through;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.compaction.awaiting_sync)
            .into_iter()
            .partition(|(_, sequence)| *sequence <= synced);
        self.compaction.awaiting_sync = waiting;
        for (id, _) in ready {
            let pointed_at = self.view.index().iter().any(|(_, loc)| loc.segment == id);
            if pointed_at {
                continue;
            }
            if let Some(segment) = self.segments.remove(&id) {
                self.retire(segment);
                self.compaction.space_pressure = false;
            }
        }
    }
}
