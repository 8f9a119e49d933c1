//! Crash safety with real kills: a child process (this test binary, re-executed)
//! writes batches that span shards through `write_durable` (or `write` + `flush`)
//! and reports each batch before submitting it (`BEGIN`) and once it is durable
//! (`ACK`); the parent SIGKILLs it at a random moment (sometimes while it is still
//! recovering), at least 50 times on the same store, and after every kill opens
//! the store itself and proves:
//!
//! * every acknowledged sector holds its latest acknowledged batch or a later one
//!   that was submitted for it, never an older one, never torn or mixed content;
//! * nothing seen after one recovery is lost by a later one;
//! * every batch is all or nothing: if any of its sectors shows it, every one of
//!   its sectors shows it or a later batch.
//!
//! Small segments (4 MiB), chunks (256 KiB) and checkpoint intervals (2 MiB) make
//! segments roll, checkpoints and compaction run, and kills land in them.
//! Set `BT_CRASH_SEED` to replay a run.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use blocktree_engine::{Engine, EngineConfig, Pending, SectorId, SectorKind, WriteBatch};

/// Set in the child: the store directory.
const CHILD_DIR: &str = "BT_CRASH_CHILD";
/// Set in the child: the number of its first batch.
const CHILD_START: &str = "BT_CRASH_START";
/// Set in the child: its random seed. In the parent: replays a run.
const SEED: &str = "BT_CRASH_SEED";
const GENERATION: u64 = 11;
const KILLS: usize = 50;
const MAX_ROUNDS: usize = 60;
/// Once this much time has passed, the parent stops after [`KILLS`] kills.
const SOFT_BUDGET: Duration = Duration::from_secs(35);
/// Batches the child keeps in flight.
const DEPTH: usize = 4;
const MAGIC: &[u8; 4] = b"BTCR";

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = 4;
    config.segment_bytes = 4 << 20;
    config.chunk_bytes = 256 << 10;
    // Checkpoints (and so compaction behind them) often, so kills land in both.
    config.checkpoint_bytes = 2 << 20;
    config
}

/// The sectors the child writes: six inodes, every kind of sector.
fn universe() -> Vec<SectorId> {
    let mut ids = Vec::new();
    for inode in 3..9 {
        for sector in [SectorKind::Meta, SectorKind::Merkle(0)] {
            ids.push(SectorId {
                generation: GENERATION,
                inode,
                sector,
            });
        }
        for index in 0..20 {
            ids.push(SectorId {
                generation: GENERATION,
                inode,
                sector: SectorKind::Data(index),
            });
        }
    }
    ids
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed_of(id: &SectorId) -> u64 {
    id.to_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The contents of `id` as batch `n` writes it: "BTCR", n, the id, then bytes
/// that depend on both; mostly under 2 KiB, sometimes past a 4 KiB block.
fn payload(id: &SectorId, n: u64) -> Vec<u8> {
    let mut state = seed_of(id) ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let pick = splitmix(&mut state);
    let len = if pick.is_multiple_of(16) {
        5000 + (pick >> 8) as usize % 3000
    } else {
        40 + (pick >> 8) as usize % 1500
    };
    let mut out = Vec::with_capacity(len + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&id.to_bytes());
    while out.len() < len {
        out.extend_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The batch whose exact [`payload`] `bytes` is, or `None` if it is no batch's.
fn batch_of(id: &SectorId, bytes: &[u8]) -> Option<u64> {
    if bytes.len() < 12 || &bytes[..4] != MAGIC {
        return None;
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[4..12]);
    let n = u64::from_le_bytes(word);
    (payload(id, n) == bytes).then_some(n)
}

fn format_id(id: &SectorId) -> String {
    match id.sector {
        SectorKind::Meta => format!("{}:m", id.inode),
        SectorKind::Merkle(_) => format!("{}:k", id.inode),
        SectorKind::Data(index) => format!("{}:{index}", id.inode),
    }
}

fn parse_id(text: &str) -> SectorId {
    let (inode, sector) = text.split_once(':').unwrap();
    let sector = match sector {
        "m" => SectorKind::Meta,
        "k" => SectorKind::Merkle(0),
        index => SectorKind::Data(index.parse().unwrap()),
    };
    SectorId {
        generation: GENERATION,
        inode: inode.parse().unwrap(),
        sector,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| value.parse().unwrap())
}

/// The child: writes batches until killed (or until the parent is gone, or 30 s
/// have passed). Returns at once when not run as the child.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let mut n = env_u64(CHILD_START).unwrap();
    let mut state = env_u64(SEED).unwrap();
    let ids = universe();
    let stdout = std::io::stdout();
    let say = |line: String| -> bool {
        let mut out = stdout.lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    };
    let engine = Engine::open_or_create(config(Path::new(&dir)), GENERATION).unwrap();
    if !say("READY".into()) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut in_flight: VecDeque<(u64, String, Pending<()>, bool)> = VecDeque::new();
    while Instant::now() < deadline {
        let count = 1 + splitmix(&mut state) % 16;
        let mut chosen = BTreeSet::new();
        while (chosen.len() as u64) < count {
            chosen.insert(ids[(splitmix(&mut state) % ids.len() as u64) as usize]);
        }
        let list = chosen.iter().map(format_id).collect::<Vec<_>>().join(" ");
        if !say(format!("BEGIN {n} {list}")) {
            return;
        }
        let mut batch = WriteBatch::new();
        for id in &chosen {
            batch.put(*id, payload(id, n));
        }
        let then_flush = splitmix(&mut state).is_multiple_of(4);
        let pending = if then_flush {
            engine.write(batch)
        } else {
            engine.write_durable(batch)
        };
        in_flight.push_back((n, list, pending, then_flush));
        n += 1;
        while in_flight.len() >= DEPTH
            || (!in_flight.is_empty() && splitmix(&mut state).is_multiple_of(8))
        {
            let Some((done, list, pending, then_flush)) = in_flight.pop_front() else {
                break;
            };
            pending.wait().unwrap();
            if then_flush {
                engine.flush().wait().unwrap();
            }
            if !say(format!("ACK {done} {list}")) {
                return;
            }
        }
    }
}

/// What the parent knows across rounds.
#[derive(Default)]
struct Ledger {
    /// Every batch the child began, with its sectors.
    begun: HashMap<u64, Vec<SectorId>>,
    /// Per sector: the latest batch acknowledged durable.
    acked: HashMap<SectorId, u64>,
    /// Per sector: the batch the previous recovery showed.
    seen: HashMap<SectorId, u64>,
    next: u64,
    acks: u64,
}

impl Ledger {
    fn take(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        let (Some(kind), Some(n)) = (words.next(), words.next()) else {
            return;
        };
        if kind != "BEGIN" && kind != "ACK" {
            return;
        }
        let ids: Vec<SectorId> = words.map(parse_id).collect();
        match kind {
            "BEGIN" => {
                let n: u64 = n.parse().unwrap();
                self.next = self.next.max(n + 1);
                assert!(self.begun.insert(n, ids).is_none(), "batch {n} begun twice");
            }
            "ACK" => {
                let n: u64 = n.parse().unwrap();
                assert_eq!(self.begun.get(&n), Some(&ids), "ACK {n} without its BEGIN");
                self.acks += 1;
                for id in ids {
                    let latest = self.acked.entry(id).or_default();
                    *latest = (*latest).max(n);
                }
            }
            _ => {}
        }
    }

    /// Opens the store and checks it against everything the child reported.
    fn verify(&mut self, dir: &Path, round: usize) {
        let engine = Engine::open(config(dir))
            .unwrap_or_else(|error| panic!("round {round}: recovery failed: {error}"));
        let mut observed: HashMap<SectorId, u64> = HashMap::new();
        for id in universe() {
            let got = engine
                .read(id)
                .wait()
                .unwrap_or_else(|error| panic!("round {round}: reading {id:?}: {error}"));
            let floor_acked = self.acked.get(&id).copied();
            let floor_seen = self.seen.get(&id).copied();
            let Some(bytes) = got else {
                assert!(
                    floor_acked.is_none() && floor_seen.is_none(),
                    "round {round}: {id:?} reads None, but batch {floor_acked:?} was \
                     acknowledged for it and recovery showed batch {floor_seen:?} before"
                );
                continue;
            };
            let n = batch_of(&id, &bytes).unwrap_or_else(|| {
                panic!(
                    "round {round}: {id:?} holds {} bytes that are no batch's content \
                     (torn or mixed; header {:02x?})",
                    bytes.len(),
                    &bytes[..bytes.len().min(40)]
                )
            });
            assert!(
                self.begun.get(&n).is_some_and(|ids| ids.contains(&id)),
                "round {round}: {id:?} holds batch {n}, which was never submitted for it"
            );
            if let Some(acked) = floor_acked {
                assert!(
                    n >= acked,
                    "round {round}: {id:?} holds batch {n}, older than acknowledged batch {acked}"
                );
            }
            if let Some(seen) = floor_seen {
                assert!(
                    n >= seen,
                    "round {round}: {id:?} holds batch {n}, but an earlier recovery showed {seen}"
                );
            }
            observed.insert(id, n);
        }
        for (n, ids) in &self.begun {
            if !ids.iter().any(|id| observed.get(id) == Some(n)) {
                continue;
            }
            let behind: Vec<_> = ids
                .iter()
                .filter(|id| observed.get(id).is_none_or(|shown| shown < n))
                .map(|id| (format_id(id), observed.get(id).copied()))
                .collect();
            assert!(
                behind.is_empty(),
                "round {round}: batch {n} is torn: some of its sectors show it, but these \
                 show older batches: {behind:?} (batch: {:?})",
                ids.iter().map(format_id).collect::<Vec<_>>()
            );
        }
        self.seen = observed;
        engine.shutdown().unwrap();
    }
}

#[test]
fn sigkill_never_loses_acknowledged_or_tears_batches() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = env_u64(SEED).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("crash: {SEED}={seed}");
    let mut state = seed;
    let mut ledger = Ledger {
        next: 1,
        ..Ledger::default()
    };
    let started = Instant::now();
    let mut kills = 0;
    let mut during_recovery = 0;
    for round in 0..MAX_ROUNDS {
        if kills >= KILLS && started.elapsed() > SOFT_BUDGET {
            break;
        }
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_START, ledger.next.to_string())
            .env(SEED, splitmix(&mut state).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines, receive) = mpsc::channel::<String>();
        let reader = thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            // A line cut short by the kill has no newline: the child had not
            // finished saying it (and so had not submitted a batch it began).
            while stdout.read_line(&mut line).is_ok_and(|read| read > 0) {
                if let Some(whole) = line.strip_suffix('\n')
                    && lines.send(whole.to_owned()).is_err()
                {
                    break;
                }
                line.clear();
            }
        });
        let delay = Duration::from_millis(10 + splitmix(&mut state) % 291);
        let mut pending_lines = Vec::new();
        // Every fifth round the clock starts at spawn, so some kills land while
        // the child is still opening (recovering) the store.
        if round % 5 != 4 {
            let wait_until = Instant::now() + Duration::from_secs(30);
            loop {
                let left = wait_until.saturating_duration_since(Instant::now());
                match receive.recv_timeout(left) {
                    Ok(line) if line == "READY" => break,
                    Ok(line) => pending_lines.push(line),
                    Err(_) => {
                        let _ = child.kill();
                        panic!(
                            "round {round}: the child never opened the store: {:?}",
                            child.wait()
                        );
                    }
                }
            }
        } else {
            during_recovery += 1;
        }
        thread::sleep(delay);
        if let Some(status) = child.try_wait().unwrap() {
            panic!("round {round}: the child exited on its own ({status}); see its stderr");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        reader.join().unwrap();
        pending_lines.extend(receive.try_iter());
        for line in &pending_lines {
            ledger.take(line);
        }
        ledger.verify(dir.path(), round);
    }
    eprintln!(
        "crash: {kills} kills ({during_recovery} timed from spawn), {} batches begun, {} \
         acknowledged, {:.1?}",
        ledger.begun.len(),
        ledger.acks,
        started.elapsed()
    );
    let engine = Engine::open(config(dir.path())).unwrap();
    eprintln!("crash: the store at the end: {:?}", engine.stats().unwrap());
    engine.shutdown().unwrap();
    assert!(
        kills >= KILLS,
        "only {kills} kills within {MAX_ROUNDS} rounds"
    );
    assert!(ledger.acks > 0, "the children never acknowledged a batch");
}
