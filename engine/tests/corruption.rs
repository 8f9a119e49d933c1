//! Damage on disk is reported, never served. Each case is run twice: after a
//! clean `shutdown` (which leaves a checkpoint), and after a crash (a child
//! process that wrote the store and exited without shutting down, so opening
//! scans the log).
//!
//! * A byte flipped inside one record's payload makes that sector read
//!   `Err(Corrupt(id))` — not `None`, and not an older version of it — while
//!   every other sector still reads exactly what was written; overwriting the
//!   sector heals it, across a reopen too.
//! * A byte flipped in a chunk header costs at most the batches with records in
//!   that chunk: the store still opens, every other sector reads correctly, a
//!   damaged one reads its data, `None` or `Corrupt` (never wrong bytes), and the
//!   store takes new writes.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blocktree_engine::key::KeyDeriver;
use blocktree_engine::record::{BLOCK, ChunkHeader, Key, parse_chunk};
use blocktree_engine::superblock::Superblock;
use blocktree_engine::{Engine, EngineConfig, EngineError, SectorId, SectorKind, WriteBatch};

const GENERATION: u64 = 5;
/// Set in the child: `<plan>:<store directory>`.
const CHILD: &str = "BT_CORRUPTION_CHILD";

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.segment_bytes = 4 << 20;
    config.chunk_bytes = 64 << 10;
    config
}

fn data(inode: u64, index: u64) -> SectorId {
    SectorId {
        generation: GENERATION,
        inode,
        sector: SectorKind::Data(index),
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A marker no other payload contains.
fn marker(id: &SectorId, version: u64) -> Vec<u8> {
    format!("<<corruption-test {id:?} version {version}>>").into_bytes()
}

/// Contents of `id` at `version`: random bytes with the marker in the middle.
fn content(id: &SectorId, version: u64) -> Vec<u8> {
    let mut state = u64::from_le_bytes(id.to_bytes()[17..25].try_into().unwrap())
        ^ id.inode.rotate_left(32)
        ^ version.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let len = 1500 + (splitmix(&mut state) % 5000) as usize;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    out.truncate(len);
    let marker = marker(id, version);
    let at = len / 2;
    out[at..at + marker.len()].copy_from_slice(&marker);
    out
}

/// Batches to write, each with its sectors' versions and whether it is durable.
type Plan = Vec<(Vec<(SectorId, u64)>, bool)>;

const ALONE: SectorId = SectorId {
    generation: GENERATION,
    inode: 20,
    sector: SectorKind::Data(0),
};
const TWICE: SectorId = SectorId {
    generation: GENERATION,
    inode: 21,
    sector: SectorKind::Data(0),
};

/// 40 sectors around the victims, which are written in batches of their own with
/// more batches after them, so their chunks are not the last of their shard.
fn payload_plan(victims: &[(SectorId, u64)], durable: bool) -> Plan {
    let others: Vec<SectorId> = (3..7)
        .flat_map(|inode| (0..10).map(move |index| data(inode, index)))
        .collect();
    let mut plan: Plan = Vec::new();
    for group in others[..20].chunks(4) {
        plan.push((group.iter().map(|id| (*id, 1)).collect(), durable));
    }
    for victim in victims {
        plan.push((vec![*victim], durable));
    }
    for group in others[20..].chunks(3) {
        plan.push((group.iter().map(|id| (*id, 1)).collect(), durable));
    }
    plan
}

/// 60 sectors, each written exactly once (so "older data" can only be `None`), in
/// batches of 1 to 5, some durable.
fn header_plan() -> Plan {
    let ids: Vec<SectorId> = (3..9)
        .flat_map(|inode| (0..10).map(move |index| data(inode, index)))
        .collect();
    let mut state = 42u64;
    let mut plan = Vec::new();
    let mut rest = &ids[..];
    while !rest.is_empty() {
        let take = (1 + splitmix(&mut state) % 5).min(rest.len() as u64) as usize;
        let durable = splitmix(&mut state).is_multiple_of(2);
        plan.push((rest[..take].iter().map(|id| (*id, 1)).collect(), durable));
        rest = &rest[take..];
    }
    plan
}

fn plan_named(name: &str) -> Plan {
    match name {
        "alone-plain" => payload_plan(&[(ALONE, 1)], false),
        "alone-durable" => payload_plan(&[(ALONE, 1)], true),
        "twice-durable" => payload_plan(&[(TWICE, 1), (TWICE, 2)], true),
        "headers" => header_plan(),
        _ => panic!("no plan {name}"),
    }
}

fn latest(plan: &Plan) -> HashMap<SectorId, u64> {
    plan.iter()
        .flat_map(|(ops, _)| ops.iter().copied())
        .collect()
}

fn execute(engine: &Engine, plan: &Plan) {
    for (ops, durable) in plan {
        let mut batch = WriteBatch::new();
        for (id, version) in ops {
            batch.put(*id, content(id, *version));
        }
        if *durable {
            engine.write_durable(batch).wait().unwrap();
        } else {
            engine.write(batch).wait().unwrap();
        }
    }
}

/// Writes `plan` into a new store in `dir`, then shuts it down cleanly or, with
/// `crash`, has a child process write it and exit without shutting down.
fn build(dir: &Path, plan: &str, crash: bool) {
    if !crash {
        let engine = Engine::create(config(dir), GENERATION).unwrap();
        execute(&engine, &plan_named(plan));
        engine.shutdown().unwrap();
        return;
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "corruption_child",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(CHILD, format!("{plan}:{}", dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the writing child failed: {status}");
}

/// The child of [`build`]: writes a plan and exits without shutting down.
/// Returns at once when not run as the child.
#[test]
fn corruption_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (plan, dir) = spec.split_once(':').unwrap();
    let engine = Engine::create(config(Path::new(dir)), GENERATION).unwrap();
    execute(&engine, &plan_named(plan));
    std::process::exit(0);
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for shard in fs::read_dir(dir).unwrap() {
        let shard = shard.unwrap().path();
        let is_shard = shard
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("shard-"));
        if !is_shard {
            continue;
        }
        for file in fs::read_dir(&shard).unwrap() {
            let file = file.unwrap().path();
            if file.extension().is_some_and(|ext| ext == "seg") {
                files.push(file);
            }
        }
    }
    files.sort();
    assert!(!files.is_empty(), "no segment files in {}", dir.display());
    files
}

/// The one place in the store's segments where `pattern` occurs.
fn find_unique(dir: &Path, pattern: &[u8]) -> (PathBuf, usize) {
    let mut hits = Vec::new();
    for file in segment_files(dir) {
        let bytes = fs::read(&file).unwrap();
        let mut from = 0;
        while let Some(at) = bytes[from..]
            .windows(pattern.len())
            .position(|window| window == pattern)
        {
            hits.push((file.clone(), from + at));
            from += at + 1;
        }
    }
    assert_eq!(
        hits.len(),
        1,
        "{:?} should occur exactly once on disk: {hits:?}",
        String::from_utf8_lossy(pattern)
    );
    hits.pop().unwrap()
}

fn flip(file: &Path, at: usize) {
    let mut bytes = fs::read(file).unwrap();
    bytes[at] ^= 0x5a;
    fs::write(file, bytes).unwrap();
}

fn expect_intact(engine: &Engine, latest: &HashMap<SectorId, u64>, except: &SectorId) {
    for (id, version) in latest {
        if id == except {
            continue;
        }
        let got = engine.read(*id).wait();
        assert!(
            matches!(&got, Ok(Some(bytes)) if *bytes == content(id, *version)),
            "{id:?} should read its version {version} intact, got {:?}",
            got.map(|data| data.map(|bytes| bytes.len()))
        );
    }
}

fn expect_corrupt(engine: &Engine, victim: &SectorId, what: &str) {
    match engine.read(*victim).wait() {
        Err(EngineError::Corrupt(id)) => assert_eq!(id, *victim),
        Ok(None) => panic!("{what}: the corrupt sector {victim:?} reads None (silently lost)"),
        Ok(Some(bytes)) => {
            let version = (0..5).find(|version| bytes == content(victim, *version));
            panic!(
                "{what}: the corrupt sector {victim:?} was served ({} bytes, version {version:?})",
                bytes.len()
            )
        }
        Err(other) => panic!("{what}: expected Corrupt({victim:?}), got {other}"),
    }
}

/// Builds `plan`, flips a byte in the payload of `victim`'s `version`, and checks
/// the sector reads `Corrupt`, the others intact, and that an overwrite heals it.
fn payload_case(plan: &str, crash: bool, victim: SectorId, version: u64) {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), plan, crash);
    let (file, at) = find_unique(dir.path(), &marker(&victim, version));
    flip(&file, at + 3);

    let what = format!(
        "plan {plan}, {}",
        if crash {
            "after a crash"
        } else {
            "after shutdown"
        }
    );
    let engine = Engine::open(config(dir.path())).unwrap();
    expect_corrupt(&engine, &victim, &what);
    expect_corrupt(&engine, &victim, &format!("{what}, read again"));
    expect_intact(&engine, &latest(&plan_named(plan)), &victim);

    let mut batch = WriteBatch::new();
    batch.put(victim, content(&victim, 9));
    engine.write_durable(batch).wait().unwrap();
    assert_eq!(
        engine.read(victim).wait().unwrap(),
        Some(content(&victim, 9))
    );
    engine.shutdown().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    assert_eq!(
        engine.read(victim).wait().unwrap(),
        Some(content(&victim, 9))
    );
    engine.shutdown().unwrap();
}

#[test]
fn flipped_payload_byte_reads_corrupt_after_shutdown() {
    payload_case("alone-plain", false, ALONE, 1);
}

#[test]
fn flipped_payload_byte_reads_corrupt_after_a_crash() {
    payload_case("alone-durable", true, ALONE, 1);
}

#[test]
fn corrupt_newest_version_is_not_replaced_by_an_older_one_after_shutdown() {
    payload_case("twice-durable", false, TWICE, 2);
}

#[test]
fn corrupt_newest_version_is_not_replaced_by_an_older_one_after_a_crash() {
    payload_case("twice-durable", true, TWICE, 2);
}

/// A byte flipped while the store is open, in a record whose page is cached and
/// which reads were being answered from the page cache: the next read is
/// `Corrupt`, not the cached bytes nor anything older, and the rest is intact.
#[test]
fn flipped_payload_byte_reads_corrupt_from_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        buffered_reads: true,
        ..config(dir.path())
    };
    let engine = Engine::create(config, 3).unwrap();
    assert!(engine.reads_from_page_cache());
    let plan = plan_named("twice-durable");
    execute(&engine, &plan);
    let latest = latest(&plan);
    // The first read of each segment goes through its shard, which publishes the
    // segment's read descriptor; the second is answered on this thread.
    for _ in 0..2 {
        expect_intact(&engine, &latest, &ALONE);
    }
    let before = engine.stats().unwrap().cached_reads;
    assert_eq!(engine.read(TWICE).wait().unwrap(), Some(content(&TWICE, 2)));
    assert_eq!(
        engine.stats().unwrap().cached_reads,
        before + 1,
        "the read was not answered from the page cache"
    );

    let (file, at) = find_unique(dir.path(), &marker(&TWICE, 2));
    flip(&file, at + 3);
    expect_corrupt(&engine, &TWICE, "flipped while open");
    expect_corrupt(&engine, &TWICE, "flipped while open, read again");
    expect_intact(&engine, &latest, &TWICE);
    // Read together with its neighbours (one system call for the lot): the
    // damaged record alone is Corrupt.
    let ids: Vec<SectorId> = latest.keys().chain([&TWICE]).copied().collect();
    for (id, got) in ids.iter().zip(engine.read_many(&ids)) {
        match got.wait() {
            Err(EngineError::Corrupt(corrupt)) => assert_eq!((id, corrupt), (&TWICE, TWICE)),
            Ok(Some(bytes)) => assert!(
                *id != TWICE && bytes == content(id, latest[id]),
                "{id:?} read with its neighbours is not its latest version"
            ),
            other => panic!("{id:?} read with its neighbours: {other:?}"),
        }
    }
    engine.shutdown().unwrap();
}

/// A chunk found on disk: where, its sequence, and its records' keys and batches.
struct Chunk {
    file: PathBuf,
    offset: usize,
    sequence: u64,
    records: Vec<(Key, u64)>,
}

fn chunks(dir: &Path) -> Vec<Chunk> {
    let mut found = Vec::new();
    for file in segment_files(dir) {
        let bytes = fs::read(&file).unwrap();
        let mut offset = 0;
        while offset + BLOCK <= bytes.len() {
            let Ok(header) = ChunkHeader::parse(&bytes[offset..]) else {
                offset += BLOCK;
                continue;
            };
            let (_, entries) = parse_chunk(&bytes[offset..]).unwrap();
            let records = entries
                .into_iter()
                .map(|(_, record)| {
                    let record = record.unwrap();
                    assert!(record.payload_intact);
                    (record.header.key, record.header.batch)
                })
                .collect();
            found.push(Chunk {
                file: file.clone(),
                offset,
                sequence: header.sequence,
                records,
            });
            offset += header.disk_len();
        }
    }
    found
}

fn header_case(crash: bool) {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), "headers", crash);
    let ids: Vec<SectorId> = latest(&header_plan()).into_keys().collect();

    let keys = KeyDeriver::new(Superblock::load(dir.path()).unwrap().unwrap().salt);
    let by_key: HashMap<Key, SectorId> = ids.iter().map(|id| (keys.key(id), *id)).collect();
    let found = chunks(dir.path());
    let on_disk: usize = found.iter().map(|chunk| chunk.records.len()).sum();
    assert_eq!(on_disk, ids.len(), "every record should be found on disk");

    // The damaged chunk: one in the middle of its shard's log, not the first or last.
    let mut per_file: BTreeMap<&Path, Vec<&Chunk>> = BTreeMap::new();
    for chunk in &found {
        per_file.entry(&chunk.file).or_default().push(chunk);
    }
    let (_, in_file) = per_file
        .iter()
        .max_by_key(|(_, chunks)| chunks.len())
        .unwrap();
    assert!(in_file.len() >= 3, "too few chunks to pick a middle one");
    let damaged = in_file[in_file.len() / 2];
    let batches: BTreeSet<u64> = damaged.records.iter().map(|(_, batch)| *batch).collect();
    let affected: BTreeSet<SectorId> = found
        .iter()
        .flat_map(|chunk| &chunk.records)
        .filter(|(_, batch)| batches.contains(batch))
        .map(|(key, _)| by_key[key])
        .collect();
    flip(&damaged.file, damaged.offset + 8);

    let engine = Engine::open(config(dir.path()))
        .unwrap_or_else(|error| panic!("the store no longer opens: {error}"));
    let (mut correct, mut none, mut corrupt) = (0, 0, 0);
    for id in &ids {
        let got = engine.read(*id).wait();
        match &got {
            Ok(Some(bytes)) if *bytes == content(id, 1) => correct += 1,
            Ok(None) if affected.contains(id) => none += 1,
            Err(EngineError::Corrupt(bad)) if affected.contains(id) && bad == id => corrupt += 1,
            _ => panic!(
                "{id:?} ({}) reads {:?}",
                if affected.contains(id) {
                    "in a damaged batch"
                } else {
                    "not in a damaged batch: must read intact"
                },
                got.map(|data| data.map(|bytes| bytes.len()))
            ),
        }
    }
    eprintln!(
        "{}: chunk header of sequence {} damaged ({} records, {} sectors in its \
         batches): {correct} sectors intact, {none} read None, {corrupt} read Corrupt",
        if crash {
            "after a crash"
        } else {
            "after shutdown"
        },
        damaged.sequence,
        damaged.records.len(),
        affected.len()
    );

    // The store still takes writes, and they survive another reopen.
    let fresh = data(40, 0);
    let mut batch = WriteBatch::new();
    batch.put(fresh, content(&fresh, 1));
    engine.write_durable(batch).wait().unwrap();
    engine.shutdown().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    assert_eq!(engine.read(fresh).wait().unwrap(), Some(content(&fresh, 1)));
    for id in ids.iter().filter(|id| !affected.contains(id)) {
        assert_eq!(
            engine.read(*id).wait().unwrap(),
            Some(content(id, 1)),
            "{id:?}"
        );
    }
    engine.shutdown().unwrap();
}

#[test]
fn flipped_chunk_header_costs_only_its_batches_after_shutdown() {
    header_case(false);
}

#[test]
fn flipped_chunk_header_costs_only_its_batches_after_a_crash() {
    header_case(true);
}
