//! Durable chunks written with `RWF_DSYNC`, so a durable write needs no round of
//! `fdatasync` of its own.
//!
//! A chunk that carries a durable part is written with `RWF_DSYNC` when every
//! chunk of the shard before it is synced already or was itself written that way:
//! no segment is dirty, no plain chunk write is in flight and no round of
//! `fdatasync` is still syncing one. The write's
//! completion then means what an `fdatasync` started after it means for the same
//! chunks (the flag is the per-write form of `O_DSYNC`, and everything written
//! earlier is covered already), one system call and one hand-over to an io_uring
//! worker sooner. On the 2-core benchmark machine, 32 writers each waiting for
//! every 4 KiB write went from 45k to 53k writes/s.
//!
//! When a plain chunk is unsynced (a write that was not durable, or a moved
//! record), durable parts go back to waiting for the next round of `fdatasync`,
//! which covers the plain chunk too: a durable write still makes every write the
//! shard completed before it durable.
//!
//! This ledger also keeps `synced_through` honest: a chunk written with the flag
//! advances it only once every chunk below it is synced, since recovery treats a
//! damaged chunk at or below `synced_through` as corrupt rather than torn.

use std::collections::BTreeSet;

/// Which chunk writes in flight are plain, and which `RWF_DSYNC` chunks completed
/// above `synced_through`.
#[derive(Default)]
pub(super) struct DsyncLedger {
    /// Chunk writes in flight without the flag.
    plain_in_flight: usize,
    /// Sequences written with the flag (or never written at all) above
    /// `synced_through`, waiting for the chunks below them.
    settled: BTreeSet<u64>,
    /// Chunk writes queued with the flag (for the shard's stats).
    pub(super) chunks: u64,
}

impl DsyncLedger {
    /// Whether a chunk with a durable part may be written with `RWF_DSYNC` now;
    /// `unsynced` is whether any completed plain write is not yet durable (a
    /// segment is dirty, or a round of `fdatasync` is still on its way).
    pub(super) fn may_dsync(&self, unsynced: bool) -> bool {
        !unsynced && self.plain_in_flight == 0
    }

    /// A chunk write was queued, with the flag or without.
    pub(super) fn queued(&mut self, dsync: bool) {
        if dsync {
            self.chunks += 1;
        } else {
            self.plain_in_flight += 1;
        }
    }

    /// A chunk write completed (`ok`) or failed; a completed `RWF_DSYNC` write
    /// is durable.
    pub(super) fn completed(
        &mut self,
        dsync: bool,
        sequence: u64,
        ok: bool,
        synced_through: &mut u64,
    ) {
        if !dsync {
            self.plain_in_flight = self.plain_in_flight.saturating_sub(1);
        } else if ok {
            self.settle(sequence, synced_through);
        }
    }

    /// `sequence` needs no sync (its chunk was durable when written, or was never
    /// written); `synced_through` moves up over every settled chunk it reaches.
    pub(super) fn settle(&mut self, sequence: u64, synced_through: &mut u64) {
        if sequence > *synced_through {
            self.settled.insert(sequence);
        }
        self.advance(synced_through);
    }

    /// Moves `synced_through` up over the settled chunks just above it (call after
    /// an `fdatasync` round raised it, too).
    pub(super) fn advance(&mut self, synced_through: &mut u64) {
        while let Some(&lowest) = self.settled.first() {
            if lowest <= *synced_through {
                self.settled.pop_first();
            } else if lowest == *synced_through + 1 {
                self.settled.pop_first();
                *synced_through = lowest;
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_through_waits_for_every_chunk_below() {
        let mut ledger = DsyncLedger::default();
        let mut synced_through = 4;
        for _ in 5..=7 {
            ledger.queued(true);
        }
        // 6 and 7 finish before 5: nothing below 5 is known durable yet.
        ledger.completed(true, 7, true, &mut synced_through);
        ledger.completed(true, 6, true, &mut synced_through);
        assert_eq!(synced_through, 4);
        ledger.completed(true, 5, true, &mut synced_through);
        assert_eq!(synced_through, 7);
    }

    #[test]
    fn a_plain_write_in_flight_or_a_dirty_segment_rules_the_flag_out() {
        let mut ledger = DsyncLedger::default();
        assert!(ledger.may_dsync(false));
        assert!(!ledger.may_dsync(true));
        ledger.queued(false);
        assert!(!ledger.may_dsync(false));
        let mut synced_through = 0;
        ledger.completed(false, 1, true, &mut synced_through);
        // A plain write does not advance synced_through; only a sync round does.
        assert_eq!(synced_through, 0);
        assert!(ledger.may_dsync(false));
    }

    #[test]
    fn a_failed_write_holds_synced_through_until_a_sync_round_covers_it() {
        let mut ledger = DsyncLedger::default();
        let mut synced_through = 0;
        ledger.completed(true, 1, false, &mut synced_through);
        ledger.completed(true, 2, true, &mut synced_through);
        assert_eq!(synced_through, 0);
        // An fdatasync round covering 1 lets 2 follow.
        synced_through = 1;
        ledger.advance(&mut synced_through);
        assert_eq!(synced_through, 2);
        assert!(ledger.settled.is_empty());
    }
}
