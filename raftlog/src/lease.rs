//! Leader-lease reads: how the leader of a multi-member cluster serves a
//! linearizable read without a heartbeat round per read.
//!
//! A read-index round (openraft's `ensure_linearizable`) started at time `t`
//! that succeeds proves that a quorum acknowledged this leader in response to
//! heartbeats sent after `t`. A member that acknowledged a leader neither
//! campaigns nor grants its vote to another candidate for openraft's leader
//! lease (`election_timeout_max`) after the acknowledgement, and every quorum
//! that could elect another leader includes one of those members. So until
//! `t + LEASE` no other leader can exist, where `LEASE` is half of
//! `election_timeout_min`: reads during that time see every write
//! acknowledged before they began once this member has applied what it knows
//! committed.
//!
//! **Clock assumption.** Each member measures these intervals with its own
//! monotonic clock; the argument holds as long as no member's clock runs more
//! than twice as fast as another's over a few hundred milliseconds (the lease
//! is half the shortest time a follower waits, which is itself at most half
//! of openraft's vote lease). A member that restarts forgets when it last
//! acknowledged a leader, so a freshly started member refuses vote requests
//! for `election_timeout_min` ([`crate::network`]): it cannot help elect a
//! leader inside a lease it granted in its previous life.
//!
//! Rounds are serialized: a reader that finds no valid lease waits for the
//! round in flight and then checks the lease again, so concurrent readers
//! share one heartbeat round instead of each starting their own.
//!
//! A round falls short of a quorum when followers answer with an error or not
//! within a heartbeat interval: a connection still being set up after a join
//! or a restart, a follower busy on a loaded machine. None of that means they
//! are gone, so such a round is run again, a lease's length later (rounds stay
//! at most one per lease), for as long as a write would wait for its quorum,
//! before the read fails.

use crate::statemachine::MachineShared;
use crate::store::lock;
use crate::types::{LogId, MemberNode, NodeId, Raft};
use openraft::ServerState;
use openraft::error::{CheckIsLeaderError, RaftError};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The lease a successful read-index round gave this leader.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// The leadership (term and node) it was granted to.
    leader: openraft::LeaderId<NodeId>,
    /// The membership it was granted under: another membership has other
    /// quorums.
    membership: Option<LogId>,
    /// When it runs out.
    expires: Instant,
}

/// A leader's read lease and the serialization of its read-index rounds.
pub(crate) struct ReadLease {
    duration: Duration,
    /// How long rounds short of a quorum are retried before a read fails.
    patience: Duration,
    held: Mutex<Option<Held>>,
    round: tokio::sync::Mutex<()>,
    /// Read-index rounds run (for status and tests).
    rounds: AtomicU64,
}

/// Why no read index could be had.
pub(crate) type ReadIndexError = RaftError<NodeId, CheckIsLeaderError<NodeId, MemberNode>>;

impl ReadLease {
    /// A lease of half `election_timeout_min` (see the module documentation);
    /// rounds short of a quorum are retried for `patience`.
    pub(crate) fn new(election_timeout_min: Duration, patience: Duration) -> ReadLease {
        ReadLease {
            duration: election_timeout_min / 2,
            patience,
            held: Mutex::new(None),
            round: tokio::sync::Mutex::new(()),
            rounds: AtomicU64::new(0),
        }
    }

    /// Read-index rounds run so far.
    pub(crate) fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// On the leader: the log index a linearizable read must wait for this
    /// member to have applied (`None`: nothing). From the lease while it
    /// holds, else from a read-index round (shared with concurrent readers).
    pub(crate) async fn read_index(
        &self,
        raft: &Raft,
        machine: &MachineShared,
    ) -> Result<Option<u64>, ReadIndexError> {
        if let Some(index) = self.valid(raft, machine) {
            return Ok(index);
        }
        let _round = self.round.lock().await;
        let deadline = Instant::now() + self.patience;
        loop {
            // The round this reader waited for may have renewed the lease.
            if let Some(index) = self.valid(raft, machine) {
                return Ok(index);
            }
            let started = Instant::now();
            let before = raft.metrics().borrow().vote;
            self.rounds.fetch_add(1, Ordering::Relaxed);
            let read = match raft.ensure_linearizable().await {
                Ok(read) => read,
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(self.duration).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let metrics = raft.metrics().borrow().clone();
            // Only a round run wholly under one committed leadership grants a lease.
            if metrics.state == ServerState::Leader
                && metrics.vote == before
                && metrics.vote.is_committed()
            {
                *lock(&self.held) = Some(Held {
                    leader: *metrics.vote.leader_id(),
                    membership: *metrics.membership_config.log_id(),
                    expires: started + self.duration,
                });
            }
            return Ok(read.map(|id| id.index));
        }
    }

    /// The index to wait for if this member leads under a valid lease.
    fn valid(&self, raft: &Raft, machine: &MachineShared) -> Option<Option<u64>> {
        let held = (*lock(&self.held))?;
        if Instant::now() >= held.expires {
            return None;
        }
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        if metrics.state != ServerState::Leader
            || !metrics.vote.is_committed()
            || *metrics.vote.leader_id() != held.leader
            || *metrics.membership_config.log_id() != held.membership
        {
            return None;
        }
        // Every write acknowledged before this read was applied by this
        // leader (or, from an earlier term, lies below the index the round
        // that granted the lease waited for): what it knows committed covers
        // them.
        let committed = *lock(&machine.committed);
        let applied = metrics.last_applied.map(|id| id.index);
        Some(committed.max(applied))
    }
}
