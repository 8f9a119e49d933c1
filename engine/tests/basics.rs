//! The engine's basic contract on real files and real io_uring: sectors round-trip
//! across every shard; an overwrite returns the newest data, a delete and a
//! never-written sector read `None`; a batch that spans shards is visible as a
//! whole once it completes; everything
//! survives `shutdown` and reopen (and the store's shard count wins over the
//! opener's), with O_DIRECT and buffered I/O; sizes from 0 B to `MAX_PAYLOAD`
//! are stored and anything larger is refused with `TooLarge`, writing nothing of
//! its batch; `allocate_inode` never hands out an inode twice, across reopen too;
//! `create` refuses an existing store, `open` an empty directory, a bad
//! configuration is refused, a closed engine answers `Closed`, and `Pending` works
//! as a future.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;

use blocktree_engine::key::{KeyDeriver, shard_of};
use blocktree_engine::record::MAX_PAYLOAD;
use blocktree_engine::superblock::{FIRST_INODE, Superblock};
use blocktree_engine::{Engine, EngineConfig, EngineError, SectorId, SectorKind, WriteBatch};

const GENERATION: u64 = 7;
const SHARDS: usize = 4;

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = SHARDS;
    config.segment_bytes = 8 << 20;
    config.chunk_bytes = 256 << 10;
    config
}

fn id(inode: u64, sector: SectorKind) -> SectorId {
    SectorId {
        generation: GENERATION,
        inode,
        sector,
    }
}

fn data(inode: u64, index: u64) -> SectorId {
    id(inode, SectorKind::Data(index))
}

/// Every kind of sector of inodes `inodes`, `per_inode` data sectors each.
fn sectors(inodes: std::ops::Range<u64>, per_inode: u64) -> Vec<SectorId> {
    let mut ids = Vec::new();
    for inode in inodes {
        ids.push(id(inode, SectorKind::Meta));
        ids.push(id(inode, SectorKind::Merkle(0)));
        ids.extend((0..per_inode).map(|index| data(inode, index)));
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

/// The contents of `id` at `version`: the version (8 bytes LE), the id, then
/// bytes that depend on both, `len` bytes in all (the header is cut short when
/// `len` is smaller).
fn content(id: &SectorId, version: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&id.to_bytes());
    let mut state = seed_of(id) ^ version.wrapping_mul(0x2545_f491_4f6c_dd1d);
    while out.len() < len {
        out.extend_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The version of a [`content`] of at least 8 bytes.
fn version_of(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

/// Which shard each sector belongs to, from the store's salt.
fn shard_map(dir: &Path, shards: usize) -> impl Fn(&SectorId) -> usize {
    let superblock = Superblock::load(dir).unwrap().unwrap();
    let keys = KeyDeriver::new(superblock.salt);
    move |id| shard_of(&keys.key(id), shards)
}

fn write(engine: &Engine, ops: &[(SectorId, Option<Vec<u8>>)]) {
    let mut batch = WriteBatch::new();
    for (id, data) in ops {
        match data {
            Some(data) => batch.put(*id, data.clone()),
            None => batch.delete(*id),
        };
    }
    engine.write(batch).wait().unwrap();
}

fn check(engine: &Engine, expected: &HashMap<SectorId, Option<Vec<u8>>>) {
    for (id, want) in expected {
        let got = engine.read(*id).wait().unwrap();
        assert!(
            got == *want,
            "{id:?}: read {:?} bytes, expected {:?} bytes (or contents differ)",
            got.as_ref().map(Vec::len),
            want.as_ref().map(Vec::len)
        );
    }
}

fn live(expected: &HashMap<SectorId, Option<Vec<u8>>>) -> (u64, u64) {
    expected
        .values()
        .flatten()
        .fold((0, 0), |(sectors, bytes), data| {
            (sectors + 1, bytes + data.len() as u64)
        })
}

#[test]
fn round_trip_across_all_shards() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    assert_eq!(engine.generation(), GENERATION);
    let shard = shard_map(dir.path(), SHARDS);
    let ids = sectors(3..11, 16);
    let used: BTreeSet<usize> = ids.iter().map(&shard).collect();
    assert_eq!(
        used.len(),
        SHARDS,
        "the test's sectors should cover every shard"
    );

    let mut expected = HashMap::new();
    for (n, group) in ids.chunks(7).enumerate() {
        let ops: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, Some(content(id, n as u64, 100 + 997 * ((n + i) % 9)))))
            .collect();
        write(&engine, &ops);
        expected.extend(ops);
    }
    check(&engine, &expected);
    for never in [
        data(3, 16),
        data(3, 1 << 40),
        data(99, 0),
        id(99, SectorKind::Meta),
        SectorId {
            generation: GENERATION + 1,
            ..data(3, 0)
        },
    ] {
        assert_eq!(
            engine.read(never).wait().unwrap(),
            None,
            "{never:?} was never written"
        );
    }

    let stats = engine.stats().unwrap();
    let (sectors, bytes) = live(&expected);
    assert_eq!(
        (stats.live_sectors, stats.live_bytes),
        (sectors, bytes),
        "{stats:?}"
    );
    assert!(
        stats.segments >= 1 && stats.disk_bytes >= bytes,
        "{stats:?}"
    );
    engine.shutdown().unwrap();
}

#[test]
fn overwrite_delete_and_duplicates_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    let ids = sectors(3..5, 6);
    let mut expected: HashMap<SectorId, Option<Vec<u8>>> = HashMap::new();

    // Three generations of every sector, each of another length: the newest wins.
    for version in 1..=3u64 {
        let ops: Vec<_> = ids
            .iter()
            .map(|id| (*id, Some(content(id, version, 300 * version as usize + 17))))
            .collect();
        write(&engine, &ops);
        expected.extend(ops);
        check(&engine, &expected);
    }

    // Deleting hides a sector; deleting one never written is harmless.
    let deleted: Vec<_> = ids.iter().step_by(3).map(|id| (*id, None)).collect();
    write(&engine, &deleted);
    expected.extend(deleted);
    write(&engine, &[(data(50, 0), None)]);
    expected.insert(data(50, 0), None);
    check(&engine, &expected);

    // A deleted sector can be written again.
    let again = (ids[0], Some(content(&ids[0], 9, 4096)));
    write(&engine, std::slice::from_ref(&again));
    expected.insert(again.0, again.1);
    check(&engine, &expected);

    // Within one batch, the last operation on a sector wins.
    let (a, b, c) = (data(60, 0), data(60, 1), data(60, 2));
    write(
        &engine,
        &[
            (a, Some(content(&a, 1, 100))),
            (a, Some(content(&a, 2, 200))),
            (b, Some(content(&b, 1, 100))),
            (b, None),
            (c, None),
            (c, Some(content(&c, 3, 300))),
        ],
    );
    expected.insert(a, Some(content(&a, 2, 200)));
    expected.insert(b, None);
    expected.insert(c, Some(content(&c, 3, 300)));
    check(&engine, &expected);

    let stats = engine.stats().unwrap();
    assert_eq!(
        (stats.live_sectors, stats.live_bytes),
        live(&expected),
        "{stats:?}"
    );

    // The same after a reopen: recovery replays in order, not just the index.
    engine.shutdown().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    check(&engine, &expected);
    let stats = engine.stats().unwrap();
    assert_eq!(
        (stats.live_sectors, stats.live_bytes),
        live(&expected),
        "{stats:?}"
    );
    engine.shutdown().unwrap();
}

#[test]
fn batch_spanning_shards_is_visible_as_a_whole_once_complete() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    let shard = shard_map(dir.path(), SHARDS);
    let ids = sectors(3..5, 10);
    let used: BTreeSet<usize> = ids.iter().map(&shard).collect();
    assert_eq!(used.len(), SHARDS, "each batch should span every shard");

    let len = |id: &SectorId, version: u64| 64 + (seed_of(id) ^ version) as usize % 3000;
    let all = |version: u64| -> Vec<_> {
        ids.iter()
            .map(|id| (*id, Some(content(id, version, len(id, version)))))
            .collect()
    };
    write(&engine, &all(0));

    // The writer publishes a version only after its batch completed; readers that
    // start afterwards must find that version or a later one on every sector, and
    // never a mixed or torn sector.
    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (engine, ids, published, stop) =
                (engine.clone(), ids.clone(), published.clone(), stop.clone());
            thread::spawn(move || {
                let mut passes = 0u64;
                while !stop.load(Ordering::Acquire) {
                    // A batch in flight may show on one shard a moment before
                    // another (the engine promises whole batches after completion
                    // and after a crash, not snapshot reads across shards).
                    let completed = published.load(Ordering::Acquire);
                    for id in &ids {
                        let got = engine.read(*id).wait().unwrap().unwrap();
                        let version = version_of(&got);
                        assert!(
                            version >= completed,
                            "{id:?} shows batch {version} after batch {completed} completed"
                        );
                        assert_eq!(
                            got,
                            content(id, version, len(id, version)),
                            "{id:?} is torn"
                        );
                    }
                    passes += 1;
                }
                passes
            })
        })
        .collect();
    for version in 1..=150 {
        let mut batch = WriteBatch::new();
        for (id, data) in all(version) {
            batch.put(id, data.unwrap());
        }
        engine.write(batch).wait().unwrap();
        published.store(version, Ordering::Release);
        // Right after completion, every sector of the batch is visible.
        for id in &ids {
            let got = engine.read(*id).wait().unwrap().unwrap();
            assert_eq!(
                version_of(&got),
                version,
                "{id:?} right after batch {version}"
            );
        }
    }
    stop.store(true, Ordering::Release);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    engine.shutdown().unwrap();
}

#[test]
fn reopen_after_shutdown_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    let ids = sectors(3..9, 12);
    let mut expected = HashMap::new();
    let mut state = 1u64;
    for round in 0..40u64 {
        let mut ops = Vec::new();
        for _ in 0..1 + splitmix(&mut state) % 8 {
            let id = ids[(splitmix(&mut state) % ids.len() as u64) as usize];
            let op = if splitmix(&mut state).is_multiple_of(5) {
                None
            } else {
                Some(content(&id, round, (splitmix(&mut state) % 9000) as usize))
            };
            ops.push((id, op));
        }
        if round.is_multiple_of(2) {
            write(&engine, &ops);
        } else {
            let mut batch = WriteBatch::new();
            for (id, data) in &ops {
                match data {
                    Some(data) => batch.put(*id, data.clone()),
                    None => batch.delete(*id),
                };
            }
            engine.write_durable(batch).wait().unwrap();
        }
        expected.extend(ops);
    }
    check(&engine, &expected);
    let before = engine.stats().unwrap();
    engine.shutdown().unwrap();

    // The store's layout decides the shard count, not the opener's config.
    let mut other = config(dir.path());
    other.shards = 1;
    let engine = Engine::open(other).unwrap();
    assert_eq!(engine.generation(), GENERATION);
    check(&engine, &expected);
    let after = engine.stats().unwrap();
    assert_eq!(
        (after.live_sectors, after.live_bytes),
        (before.live_sectors, before.live_bytes)
    );
    assert_eq!((after.live_sectors, after.live_bytes), live(&expected));

    // Writes go on after a reopen, and a second reopen keeps both eras.
    let more: Vec<_> = sectors(20..22, 3)
        .into_iter()
        .map(|id| (id, Some(content(&id, 1000, 777))))
        .collect();
    write(&engine, &more);
    expected.extend(more);
    engine.flush().wait().unwrap();
    engine.shutdown().unwrap();
    let engine = Engine::open_or_create(config(dir.path()), GENERATION + 1).unwrap();
    assert_eq!(
        engine.generation(),
        GENERATION,
        "open_or_create opened the store"
    );
    check(&engine, &expected);
    engine.shutdown().unwrap();
}

#[test]
fn sector_sizes_up_to_the_limit() {
    for (chunk_bytes, label) in [
        (256usize << 10, "256 KiB chunks"),
        (2 << 20, "2 MiB chunks"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.chunk_bytes = chunk_bytes;
        let engine = Engine::create(config.clone(), GENERATION).unwrap();
        let sizes = [
            0usize,
            1,
            512,
            4095,
            4096,
            4097,
            64 << 10,
            1 << 20,
            MAX_PAYLOAD,
        ];
        let mut expected = HashMap::new();
        // The small ones together in one batch, each large one in a batch of its own.
        let small: Vec<_> = sizes[..6]
            .iter()
            .enumerate()
            .map(|(i, len)| {
                (
                    data(3, i as u64),
                    Some(content(&data(3, i as u64), 1, *len)),
                )
            })
            .collect();
        write(&engine, &small);
        expected.extend(small);
        for (i, len) in sizes.iter().enumerate().skip(6) {
            let id = data(4, i as u64);
            let one = [(id, Some(content(&id, 1, *len)))];
            let mut batch = WriteBatch::new();
            batch.put(id, content(&id, 1, *len));
            engine
                .write(batch)
                .wait()
                .unwrap_or_else(|error| panic!("{label}: writing {len} bytes: {error}"));
            expected.extend(one);
        }
        check(&engine, &expected);

        // One byte over the limit: refused, and nothing of its batch is written.
        let (big, bystander) = (data(5, 0), data(5, 1));
        let mut batch = WriteBatch::new();
        batch
            .put(bystander, vec![1; 10])
            .put(big, vec![0; MAX_PAYLOAD + 1]);
        match engine.write(batch).wait() {
            Err(EngineError::TooLarge { len, max }) => {
                assert_eq!((len, max), (MAX_PAYLOAD + 1, MAX_PAYLOAD));
            }
            other => panic!("{label}: expected TooLarge, got {other:?}"),
        }
        let mut batch = WriteBatch::new();
        batch.put(big, vec![0; MAX_PAYLOAD + 1]);
        assert!(matches!(
            engine.write_durable(batch).wait(),
            Err(EngineError::TooLarge { .. })
        ));
        expected.insert(big, None);
        expected.insert(bystander, None);
        check(&engine, &expected);

        engine.shutdown().unwrap();
        let engine = Engine::open(config).unwrap();
        check(&engine, &expected);
        assert_eq!(
            engine.stats().unwrap().live_sectors,
            sizes.len() as u64,
            "{label}"
        );
        engine.shutdown().unwrap();
    }
}

#[test]
fn allocate_inode_is_monotonic_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    let first = engine.allocate_inode().unwrap();
    assert!(first >= FIRST_INODE, "inode {first} is reserved");
    let second = engine.allocate_inode().unwrap();
    assert!(second > first);

    // From several threads at once: no inode twice.
    let seen = Arc::new(Mutex::new(BTreeSet::from([first, second])));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (engine, seen) = (engine.clone(), seen.clone());
            thread::spawn(move || {
                for _ in 0..10 {
                    let inode = engine.allocate_inode().unwrap();
                    assert!(
                        seen.lock().unwrap().insert(inode),
                        "inode {inode} handed out twice"
                    );
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let highest = *seen.lock().unwrap().last().unwrap();
    engine.shutdown().unwrap();

    let engine = Engine::open(config(dir.path())).unwrap();
    let next = engine.allocate_inode().unwrap();
    assert!(
        next > highest,
        "inode {next} after reopen, but {highest} was handed out before"
    );
    engine.shutdown().unwrap();
}

#[test]
fn create_refuses_an_existing_store() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    write(&engine, &[(data(3, 0), Some(b"kept".to_vec()))]);
    engine.shutdown().unwrap();
    match Engine::create(config(dir.path()), GENERATION) {
        Err(EngineError::Layout(_)) => {}
        Err(other) => panic!("expected Layout, got {other}"),
        Ok(_) => panic!("create overwrote an existing store"),
    }
    // The refused create harmed nothing.
    let engine = Engine::open(config(dir.path())).unwrap();
    assert_eq!(
        engine.read(data(3, 0)).wait().unwrap(),
        Some(b"kept".to_vec())
    );
    engine.shutdown().unwrap();
}

#[test]
fn open_refuses_an_empty_or_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    match Engine::open(config(dir.path())) {
        Err(EngineError::Layout(_)) => {}
        Err(other) => panic!("expected Layout, got {other}"),
        Ok(_) => panic!("opened a store in an empty directory"),
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a failed open left files behind"
    );
    let missing = dir.path().join("missing");
    assert!(matches!(
        Engine::open(config(&missing)),
        Err(EngineError::Layout(_))
    ));
    assert!(!missing.exists());
}

type ConfigChange = fn(&mut EngineConfig);

#[test]
fn invalid_configurations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad: [(&str, ConfigChange); 4] = [
        ("no shards", |config| config.shards = 0),
        ("33 shards", |config| config.shards = 33),
        ("tiny chunks", |config| config.chunk_bytes = 32 << 10),
        ("unaligned chunks", |config| {
            config.chunk_bytes = (256 << 10) + 512
        }),
    ];
    for (what, change) in bad {
        let mut config = config(dir.path());
        change(&mut config);
        match Engine::create(config, GENERATION) {
            Err(EngineError::Config(_)) => {}
            Err(other) => panic!("{what}: expected Config, got {other}"),
            Ok(engine) => {
                engine.shutdown().unwrap();
                panic!("{what}: accepted");
            }
        }
    }
}

#[test]
fn a_closed_engine_answers_closed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    write(&engine, &[(data(3, 0), Some(vec![5; 100]))]);
    let clone = engine.clone();
    engine.shutdown().unwrap();
    assert!(matches!(
        clone.read(data(3, 0)).wait(),
        Err(EngineError::Closed)
    ));
    let mut batch = WriteBatch::new();
    batch.put(data(3, 1), vec![1]);
    assert!(matches!(
        clone.write(batch.clone()).wait(),
        Err(EngineError::Closed)
    ));
    assert!(matches!(
        clone.write_durable(batch).wait(),
        Err(EngineError::Closed)
    ));
    assert!(matches!(clone.flush().wait(), Err(EngineError::Closed)));
    assert!(matches!(clone.stats(), Err(EngineError::Closed)));
    // Shutting down again is harmless (a clone may report Closed, as documented).
    assert!(matches!(
        clone.shutdown(),
        Ok(()) | Err(EngineError::Closed)
    ));
    // Nothing written after the shutdown reached the store.
    let engine = Engine::open(config(dir.path())).unwrap();
    assert_eq!(engine.read(data(3, 1)).wait().unwrap(), None);
    assert_eq!(engine.read(data(3, 0)).wait().unwrap(), Some(vec![5; 100]));
    engine.shutdown().unwrap();
}

#[test]
fn buffered_io_round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.direct_io = false;
    let engine = Engine::create(config.clone(), GENERATION).unwrap();
    let ids = sectors(3..6, 8);
    let ops: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, Some(content(id, 1, 1 + 811 * i))))
        .collect();
    for group in ops.chunks(5) {
        write(&engine, group);
    }
    let expected: HashMap<_, _> = ops.into_iter().collect();
    check(&engine, &expected);
    engine.shutdown().unwrap();
    let engine = Engine::open(config).unwrap();
    check(&engine, &expected);
    engine.shutdown().unwrap();
}

struct ThreadWaker(thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// A minimal executor: polls `future` on this thread, parking between polls.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut context = Context::from_waker(&waker);
    loop {
        match future.as_mut().poll(&mut context) {
            Poll::Ready(output) => return output,
            Poll::Pending => thread::park(),
        }
    }
}

#[test]
fn pending_is_a_future() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::create(config(dir.path()), GENERATION).unwrap();
    let ids = sectors(3..5, 4);
    block_on(async {
        let mut batch = WriteBatch::new();
        for id in &ids {
            batch.put(*id, content(id, 1, 1000));
        }
        engine.write_durable(batch).await.unwrap();
        for id in &ids {
            assert_eq!(engine.read(*id).await.unwrap(), Some(content(id, 1, 1000)));
        }
        engine.flush().await.unwrap();
        let mut empty = WriteBatch::new();
        assert!(empty.is_empty());
        engine.write(std::mem::take(&mut empty)).await.unwrap();
    });
    engine.shutdown().unwrap();
}
