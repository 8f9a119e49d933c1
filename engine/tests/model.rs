//! The engine agrees with a model (a map from sector to contents):
//!
//! * 16 threads on one engine, each owning a disjoint set of sectors spread over
//!   every shard, do random batches of puts and deletes (`write` and
//!   `write_durable`) and reads; every read of an owned sector matches the
//!   thread's model (read-your-writes), and a read of someone else's sector gives
//!   `None` or contents written for that very sector. Afterwards the whole model
//!   matches the store, and `stats` counts what the model holds, before and after
//!   a flush, shutdown and reopen. Small segments (1 MiB) and checkpoints every
//!   MiB make segments roll and compaction run underneath the threads.
//! * A property test: random sequences of batches, with a checkpoint and a
//!   reopen somewhere in the middle, leave exactly what the model says.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::thread;

use blocktree_engine::{Engine, EngineConfig, SectorId, SectorKind, WriteBatch};
use proptest::prelude::*;

const GENERATION: u64 = 21;
const THREADS: usize = 16;
const OPS_PER_THREAD: usize = 500;

type Model = HashMap<SectorId, Option<Vec<u8>>>;

fn config(dir: &Path, shards: usize) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = shards;
    config.segment_bytes = 1 << 20;
    config.chunk_bytes = 64 << 10;
    // Checkpoints, and compaction behind them, while the threads run.
    config.checkpoint_bytes = 1 << 20;
    config
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 8 inodes × (meta, Merkle, 30 data sectors).
fn key_space() -> Vec<SectorId> {
    let mut ids = Vec::new();
    for inode in 3..11 {
        for sector in [SectorKind::Meta, SectorKind::Merkle(0)]
            .into_iter()
            .chain((0..30).map(SectorKind::Data))
        {
            ids.push(SectorId {
                generation: GENERATION,
                inode,
                sector,
            });
        }
    }
    ids
}

/// Contents written for `id`: the id itself first (when `len` allows), so a read
/// can tell whose contents it got, then bytes unique to (`id`, `stamp`).
fn content(id: &SectorId, stamp: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    out.extend_from_slice(&id.to_bytes());
    let mut state = stamp ^ (u64::from(id.to_bytes()[24]) << 56) ^ (id.inode << 40);
    while out.len() < len {
        out.extend_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn belongs_to(id: &SectorId, bytes: &[u8]) -> bool {
    let own = id.to_bytes();
    let n = bytes.len().min(own.len());
    bytes[..n] == own[..n]
}

fn verify(engine: &Engine, model: &Model, when: &str) {
    for (id, want) in model {
        let got = engine.read(*id).wait().unwrap();
        assert!(
            got == *want,
            "{when}: {id:?} reads {:?} bytes, the model holds {:?}",
            got.map(|bytes| bytes.len()),
            want.as_ref().map(Vec::len)
        );
    }
    // The same, many at a time (records read together where they lie together).
    let ids: Vec<SectorId> = model.keys().copied().collect();
    for chunk in ids.chunks(37) {
        for (id, got) in chunk.iter().zip(engine.read_many(chunk)) {
            let got = got.wait().unwrap();
            assert!(
                got == model[id],
                "{when}: {id:?} read with others differs from the model"
            );
        }
    }
    let stats = engine.stats().unwrap();
    let live: Vec<usize> = model.values().flatten().map(Vec::len).collect();
    assert_eq!(
        (stats.live_sectors, stats.live_bytes),
        (live.len() as u64, live.iter().sum::<usize>() as u64),
        "{when}: stats {stats:?} disagree with the model"
    );
}

/// One thread's work: random operations on the sectors it owns.
/// Returns the thread's model and the payload bytes it wrote.
fn worker(engine: Engine, thread: usize, owned: Vec<SectorId>, all: Vec<SectorId>) -> (Model, u64) {
    let mut state = 0x5eed ^ thread as u64;
    let mut model: Model = owned.iter().map(|id| (*id, None)).collect();
    let mut written = 0u64;
    let sizes = [0usize, 40, 512, 4096, 4097, 20_000];
    for op in 0..OPS_PER_THREAD {
        let pick =
            |state: &mut u64, ids: &[SectorId]| ids[(splitmix(state) % ids.len() as u64) as usize];
        match splitmix(&mut state) % 10 {
            0..=4 => {
                let mut batch = WriteBatch::new();
                let mut ops = Vec::new();
                for _ in 0..1 + splitmix(&mut state) % 4 {
                    let id = pick(&mut state, &owned);
                    let data = (!splitmix(&mut state).is_multiple_of(4)).then(|| {
                        let len = sizes[(splitmix(&mut state) % sizes.len() as u64) as usize];
                        content(&id, (thread * OPS_PER_THREAD + op) as u64, len)
                    });
                    match &data {
                        Some(data) => batch.put(id, data.clone()),
                        None => batch.delete(id),
                    };
                    ops.push((id, data));
                }
                let pending = if splitmix(&mut state).is_multiple_of(5) {
                    engine.write_durable(batch)
                } else {
                    engine.write(batch)
                };
                pending.wait().unwrap();
                written += ops
                    .iter()
                    .flat_map(|(_, data)| data)
                    .map(|data| data.len() as u64)
                    .sum::<u64>();
                model.extend(ops);
            }
            5..=6 => {
                let id = pick(&mut state, &owned);
                let got = engine.read(id).wait().unwrap();
                assert!(
                    got == model[&id],
                    "thread {thread}, op {op}: {id:?} reads {:?} bytes, the model holds {:?}",
                    got.map(|bytes| bytes.len()),
                    model[&id].as_ref().map(Vec::len)
                );
            }
            7..=8 => {
                // A run of neighbours (often written together) and a repeat.
                let first = (splitmix(&mut state) % owned.len() as u64) as usize;
                let mut ids: Vec<SectorId> =
                    owned.iter().cycle().skip(first).take(6).copied().collect();
                ids.push(ids[0]);
                for (id, got) in ids.iter().zip(engine.read_many(&ids)) {
                    let got = got.wait().unwrap();
                    assert!(
                        got == model[id],
                        "thread {thread}, op {op}: {id:?} read with others reads {:?} bytes, the model holds {:?}",
                        got.map(|bytes| bytes.len()),
                        model[id].as_ref().map(Vec::len)
                    );
                }
            }
            _ => {
                let ids: Vec<SectorId> = (0..4).map(|_| pick(&mut state, &all)).collect();
                for (id, got) in ids.iter().zip(engine.read_many(&ids)) {
                    if let Some(bytes) = got.wait().unwrap() {
                        assert!(
                            belongs_to(id, &bytes),
                            "{id:?} holds another sector's contents"
                        );
                    }
                }
            }
        }
    }
    (model, written)
}

#[test]
fn concurrent_owners_match_the_model_across_reopen() {
    concurrent_owners(false);
}

/// The same, with reads through the page cache: most are then answered on the
/// reading thread (cached.rs) while the shards write, checkpoint, compact and
/// reuse segment files under them.
#[test]
fn concurrent_owners_match_the_model_reading_from_the_page_cache() {
    concurrent_owners(true);
}

fn concurrent_owners(buffered_reads: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = |dir: &Path| EngineConfig {
        buffered_reads,
        ..config(dir, 4)
    };
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    let all = key_space();
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let owned: Vec<SectorId> = all.iter().skip(thread).step_by(THREADS).copied().collect();
            let (engine, all) = (engine.clone(), all.clone());
            thread::spawn(move || worker(engine, thread, owned, all))
        })
        .collect();
    let mut model = Model::new();
    let mut written = 0;
    for worker in workers {
        let (owned, bytes) = worker.join().unwrap();
        model.extend(owned);
        written += bytes;
    }
    assert_eq!(model.len(), all.len());
    verify(&engine, &model, "after the threads");
    engine.flush().wait().unwrap();
    let stats = engine.stats().unwrap();
    eprintln!("model: {written} payload bytes written, {stats:?}");
    assert_eq!(
        engine.reads_from_page_cache(),
        buffered_reads,
        "buffered reads are answered on the reading thread"
    );
    assert_eq!(
        stats.cached_reads > 0,
        buffered_reads,
        "reads answered from the page cache: {stats:?}"
    );
    // Segments rolled and overwritten and deleted data was reclaimed: without
    // compaction the log would hold at least every byte written.
    assert!(
        stats.disk_bytes < written,
        "compaction reclaimed nothing: {written} bytes written, {stats:?}"
    );
    engine.shutdown().unwrap();

    let engine = Engine::open(config(dir.path())).unwrap();
    verify(&engine, &model, "after reopen");
    engine.shutdown().unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Put { key: usize, len: usize, stamp: u8 },
    Delete { key: usize },
}

const PROP_KEYS: usize = 12;

fn prop_id(key: usize) -> SectorId {
    SectorId {
        generation: GENERATION,
        inode: 3 + (key % 4) as u64,
        sector: match key / 4 {
            0 => SectorKind::Meta,
            1 => SectorKind::Merkle(0),
            index => SectorKind::Data(index as u64),
        },
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PROP_KEYS, 0usize..9000, any::<u8>())
            .prop_map(|(key, len, stamp)| Op::Put { key, len, stamp }),
        1 => (0..PROP_KEYS).prop_map(|key| Op::Delete { key }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn batch_sequences_match_the_model(
        batches in prop::collection::vec(prop::collection::vec(op(), 1..6), 1..24),
        reopen_at in 0usize..24,
        checkpoint_at in 0usize..24,
        durable in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::create(config(dir.path(), 3), GENERATION).unwrap();
        let mut model: Model = (0..PROP_KEYS).map(|key| (prop_id(key), None)).collect();
        for (n, ops) in batches.iter().enumerate() {
            if n == reopen_at % batches.len() {
                engine.shutdown().unwrap();
                engine = Engine::open(config(dir.path(), 3)).unwrap();
                verify(&engine, &model, "after reopen");
            }
            if n == checkpoint_at % batches.len() {
                engine.checkpoint().unwrap();
            }
            let mut batch = WriteBatch::new();
            for op in ops {
                match *op {
                    Op::Put { key, len, stamp } => {
                        let data = content(&prop_id(key), (u64::from(stamp) << 8) | n as u64, len);
                        batch.put(prop_id(key), data.clone());
                        model.insert(prop_id(key), Some(data));
                    }
                    Op::Delete { key } => {
                        batch.delete(prop_id(key));
                        model.insert(prop_id(key), None);
                    }
                }
            }
            if durable {
                engine.write_durable(batch).wait().unwrap();
            } else {
                engine.write(batch).wait().unwrap();
            }
        }
        verify(&engine, &model, "at the end");
        engine.shutdown().unwrap();
        let engine = Engine::open(config(dir.path(), 3)).unwrap();
        verify(&engine, &model, "after the final reopen");
        engine.shutdown().unwrap();
    }
}
