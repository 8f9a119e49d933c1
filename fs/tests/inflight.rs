//! A file's commit is in flight (the store holds the batch, the node's lock is
//! free) while other writes, punches, growth, truncation and reads of the same
//! file go on. Reads must see the batch and everything written since; when the
//! store then takes or refuses the batch, nothing is lost: after an fsync and a
//! remount the file reads byte for byte as the model says.
//!
//! The store is the real local one behind a gate that holds one chosen write
//! until the test lets it through or refuses it (fault injection, not a mock).

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use blocktree_core::metadata::FileMeta;
use blocktree_core::path::BtPath;
use blocktree_core::sector::SectorId;
use blocktree_fs::local::{Membership, ServiceOptions, open_service};
use blocktree_fs::{FileSystem, FsConfig, RenameMode};
use blocktree_raftlog::{ReadAccess, SectorBatch, SectorService, ServiceError};
use common::*;
use crossbeam_channel::Receiver;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Passes every call to the real store, except the first data write of the
/// armed inode (a batch carrying any of its data sectors, a namespace commit
/// with a small new file's data too): that one waits for the test's verdict (true: store it). A read
/// of data can be held too (`hold_read`). With `queue_early`, a write is
/// reported queued (`write_queued`) as it arrives, as the Raft store does, so
/// the file's next commit begins while the held one waits; batches still
/// reach the store in the order they were queued.
struct Gate {
    inner: Arc<dyn SectorService>,
    armed: AtomicU64,
    arrived: Mutex<mpsc::Sender<()>>,
    verdict: Mutex<mpsc::Receiver<bool>>,
    read_armed: AtomicU64,
    read_hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    queue_early: AtomicBool,
    order: Mutex<()>,
    queued_arrivals: Mutex<Option<mpsc::Sender<()>>>,
    queued_armed: AtomicU64,
    queued_hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl Gate {
    /// Holds the next data read of `inode` until the test sends on the
    /// returned sender; the receiver hears when the read arrives.
    fn hold_read(&self, inode: u64) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (arrived_tx, arrived) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        *self.read_hold.lock().unwrap() = Some((arrived_tx, go_rx));
        self.read_armed.store(inode, Ordering::SeqCst);
        (arrived, go)
    }
}

impl Gate {
    /// Holds the real store's report that the next batch of `inode` is
    /// queued (it has its place in the log and counts as proposed) until the
    /// test sends on the returned sender; the receiver hears when it is held.
    fn hold_queued(&self, inode: u64) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (arrived_tx, arrived) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        *self.queued_hold.lock().unwrap() = Some((arrived_tx, go_rx));
        self.queued_armed.store(inode, Ordering::SeqCst);
        (arrived, go)
    }
}

impl SectorService for Gate {
    fn generation(&self) -> u64 {
        self.inner.generation()
    }
    fn directory(&self) -> &BtPath {
        self.inner.directory()
    }
    fn allocate_inode(&self) -> Result<u64, ServiceError> {
        self.inner.allocate_inode()
    }
    fn read_meta(&self, inode: u64) -> Result<Option<FileMeta>, ServiceError> {
        self.inner.read_meta(inode)
    }
    fn read_merkle_piece(&self, inode: u64, piece: u64) -> Result<Vec<u8>, ServiceError> {
        self.inner.read_merkle_piece(inode, piece)
    }
    fn read_data(
        &self,
        inode: u64,
        indices: &[u64],
        access: Option<&ReadAccess>,
    ) -> Result<Vec<Option<Vec<u8>>>, ServiceError> {
        if self.read_armed.load(Ordering::SeqCst) == inode
            && self.read_armed.swap(0, Ordering::SeqCst) == inode
            && let Some((arrived, go)) = self.read_hold.lock().unwrap().take()
        {
            arrived.send(()).unwrap();
            go.recv().unwrap();
        }
        self.inner.read_data(inode, indices, access)
    }
    fn write(&self, batch: SectorBatch) -> Result<(), ServiceError> {
        let armed = self.armed.load(Ordering::SeqCst);
        let held = batch
            .files
            .iter()
            .any(|file| file.meta.body().ids.inode == armed && !file.data.is_empty());
        if held && self.armed.swap(0, Ordering::SeqCst) == armed {
            self.arrived.lock().unwrap().send(()).unwrap();
            if !self.verdict.lock().unwrap().recv().unwrap() {
                return Err(ServiceError::Inconsistent {
                    inode: armed,
                    reason: "refused by the test's gate".into(),
                });
            }
        }
        self.inner.write(batch)
    }
    fn write_queued(
        &self,
        batch: SectorBatch,
        queued: &mut dyn FnMut(),
    ) -> Result<(), ServiceError> {
        let armed = self.queued_armed.load(Ordering::SeqCst);
        if batch
            .files
            .iter()
            .any(|file| file.meta.body().ids.inode == armed)
            && self.queued_armed.swap(0, Ordering::SeqCst) == armed
            && let Some((arrived, go)) = self.queued_hold.lock().unwrap().take()
        {
            let mut held = || {
                arrived.send(()).unwrap();
                go.recv().unwrap();
                queued();
            };
            return self.inner.write_queued(batch, &mut held);
        }
        if !self.queue_early.load(Ordering::SeqCst) {
            let written = self.write(batch);
            queued();
            return written;
        }
        if let Some(arrivals) = &*self.queued_arrivals.lock().unwrap() {
            arrivals.send(()).unwrap();
        }
        let _order = self.order.lock().unwrap();
        queued();
        self.write(batch)
    }
    fn flush(&self) -> Result<(), ServiceError> {
        self.inner.flush()
    }
    fn subscribe(&self, inode: u64) -> Receiver<SectorId> {
        self.inner.subscribe(inode)
    }
    fn space(&self) -> Result<(u64, u64), ServiceError> {
        self.inner.space()
    }
}

/// What the test does to the file while the commit is in flight. None of it
/// commits, so none of it waits for the held batch.
#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    Punch { offset: u64, len: u64 },
    ZeroGrow { offset: u64, len: u64 },
    TruncateToZero,
    Read { offset: u64, len: u32 },
}

const MAX: u64 = 600_000;
const DIRTY_LIMIT: usize = 256 * 1024;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..MAX, 1..8_000usize, any::<u8>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        2 => (0..MAX, 1..60_000u64).prop_map(|(offset, len)| Op::Punch { offset, len }),
        1 => (0..MAX, 1..60_000u64).prop_map(|(offset, len)| Op::ZeroGrow { offset, len }),
        1 => Just(Op::TruncateToZero),
        5 => (0..MAX, 1..80_000u32).prop_map(|(offset, len)| Op::Read { offset, len }),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

fn model_write(model: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[offset as usize..end].copy_from_slice(data);
}

fn check_read(fs: &FileSystem, fh: u64, model: &[u8], offset: u64, len: u32, when: &str) {
    let got = fs.read(fh, offset, len).unwrap();
    let start = (offset as usize).min(model.len());
    let end = (offset as usize + len as usize).min(model.len());
    assert_eq!(
        got.len(),
        end - start,
        "{when}: read length at {offset}+{len}"
    );
    assert!(
        got == model[start..end],
        "{when}: read content at {offset}+{len}"
    );
}

/// Every run the file system reports a hole reads as zeros in the model.
fn check_holes(fs: &FileSystem, ino: u64, model: &[u8], when: &str) {
    let mut at = 0u64;
    for (len, hole) in fs.allocation(ino, 0, model.len() as u64).unwrap() {
        let end = (at + len).min(model.len() as u64);
        if hole {
            assert!(
                model[at as usize..end as usize].iter().all(|&b| b == 0),
                "{when}: {at}..{end} is reported a hole but holds data"
            );
        }
        at += len;
    }
}

/// A file system on the domain's real store behind a [`Gate`]; the receiver
/// hears of the held write, the sender gives the verdict on it.
fn gated(
    domain: &Domain,
    config: &FsConfig,
) -> (
    FileSystem,
    Arc<Gate>,
    mpsc::Receiver<()>,
    mpsc::Sender<bool>,
) {
    let (arrived_tx, arrived) = mpsc::channel();
    let (verdict, verdict_rx) = mpsc::channel();
    let inner: Arc<dyn SectorService> = open_service(
        &domain.data(),
        domain.creds.clone(),
        &Membership::Alone,
        &ServiceOptions::default(),
    )
    .unwrap();
    let gate = Arc::new(Gate {
        inner,
        armed: AtomicU64::new(0),
        arrived: Mutex::new(arrived_tx),
        verdict: Mutex::new(verdict_rx),
        read_armed: AtomicU64::new(0),
        read_hold: Mutex::new(None),
        queue_early: AtomicBool::new(false),
        order: Mutex::new(()),
        queued_arrivals: Mutex::new(None),
        queued_armed: AtomicU64::new(0),
        queued_hold: Mutex::new(None),
    });
    let fs = FileSystem::new(gate.clone(), domain.creds.clone(), config.clone()).unwrap();
    (fs, gate, arrived, verdict)
}

/// Creates `name` with 300,000 bytes stored (written and fsynced), so that a
/// held commit is not the file's first; returns its inode, handle and model.
fn stored_file(fs: &FileSystem, name: &str) -> (u64, u64, Vec<u8>) {
    let (attr, fh) = fs
        .create(
            &root(),
            FileSystem::ROOT,
            name.as_bytes(),
            0o644,
            0,
            libc::O_RDWR,
        )
        .unwrap();
    let mut model = Vec::new();
    let base = pattern(300_000, 7);
    fs.write(fh, 0, &base).unwrap();
    fs.fsync(fh, false).unwrap();
    model_write(&mut model, 0, &base);
    (attr.ino, fh, model)
}

/// Syncs and closes `fh`, unmounts, mounts `domain` again and checks that
/// `name` reads as `model`.
fn check_after_remount(
    fs: FileSystem,
    gate: Arc<Gate>,
    fh: u64,
    (domain, config): (&Domain, FsConfig),
    (name, ino): (&str, u64),
    model: &[u8],
) {
    fs.fsync(fh, false).unwrap();
    check_read(&fs, fh, model, 0, u32::MAX, "after fsync");
    fs.release(fh).unwrap();
    fs.sync_all().unwrap();
    drop(fs);
    drop(gate);
    let fs = domain.mount(config);
    assert_eq!(fs.resolve(&root(), &format!("/{name}")).unwrap(), ino);
    let fh = fs.open(&root(), ino, libc::O_RDONLY).unwrap();
    check_read(&fs, fh, model, 0, u32::MAX, "after remounting");
    fs.release(fh).unwrap();
}

fn run(domain: &Domain, sector_size: u32, encrypted: bool, ops: &[Op], store_it: bool) {
    let config = FsConfig {
        sector_size,
        encrypt_root: encrypted,
        dirty_limit: DIRTY_LIMIT,
        ..FsConfig::default()
    };
    let (fs, gate, arrived, verdict) = gated(domain, &config);
    let name = format!(
        "inflight-{sector_size}-{encrypted}-{}",
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let (ino, fh, mut model) = stored_file(&fs, &name);

    let big = pattern(DIRTY_LIMIT + 5_000, 101);
    let big_at = 150_000;
    model_write(&mut model, big_at, &big);
    gate.armed.store(ino, Ordering::SeqCst);
    let mut extra_handles = Vec::new();
    std::thread::scope(|scope| {
        // This write fills the buffers past the limit and commits them: the
        // gate holds that commit.
        let committer = scope.spawn(|| fs.write(fh, big_at, &big));
        arrived.recv().unwrap();
        check_read(
            &fs,
            fh,
            &model,
            0,
            u32::MAX,
            "as the commit reached the store",
        );
        check_holes(&fs, ino, &model, "as the commit reached the store");
        for op in ops {
            match *op {
                Op::Write { offset, len, seed } => {
                    let data = pattern(len, seed);
                    fs.write(fh, offset, &data).unwrap();
                    model_write(&mut model, offset, &data);
                }
                Op::Punch { offset, len } => {
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    fs.fallocate(&root(), ino, offset, len, mode).unwrap();
                    let start = (offset as usize).min(model.len());
                    let end = (offset as usize + len as usize).min(model.len());
                    model[start..end].fill(0);
                }
                Op::ZeroGrow { offset, len } => {
                    fs.fallocate(&root(), ino, offset, len, libc::FALLOC_FL_ZERO_RANGE)
                        .unwrap();
                    let end = (offset + len) as usize;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[offset as usize..end].fill(0);
                }
                Op::TruncateToZero => {
                    extra_handles
                        .push(fs.open(&root(), ino, libc::O_RDWR | libc::O_TRUNC).unwrap());
                    model.clear();
                }
                Op::Read { offset, len } => {
                    check_read(
                        &fs,
                        fh,
                        &model,
                        offset,
                        len,
                        "while the commit is in flight",
                    );
                }
            }
            assert_eq!(fs.getattr(&root(), ino).unwrap().size, model.len() as u64);
        }
        check_holes(&fs, ino, &model, "while the commit is in flight");
        verdict.send(store_it).unwrap();
        let committed = committer.join().unwrap();
        assert_eq!(
            committed.is_ok(),
            store_it,
            "the held commit: {committed:?}"
        );
    });
    check_read(&fs, fh, &model, 0, u32::MAX, "after the commit");
    check_holes(&fs, ino, &model, "after the commit");
    for handle in extra_handles {
        fs.release(handle).unwrap();
    }
    check_after_remount(fs, gate, fh, (domain, config), (&name, ino), &model);
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn cases(store_it: bool) {
    let domain = Domain::new();
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(
                prop_oneof![Just(4096u32), Just(16384u32)],
                any::<bool>(),
                prop::collection::vec(op(), 0..12),
            ),
            |(sector_size, encrypted, ops)| {
                run(&domain, sector_size, encrypted, &ops, store_it);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn changes_made_while_a_commit_is_in_flight_read_back_after_it_lands() {
    cases(true);
}

#[test]
fn changes_made_while_a_commit_is_in_flight_survive_its_refusal() {
    cases(false);
}

/// A writer that finds the file's buffers full while a commit is in flight
/// waits for it before buffering anything: the buffers stay bounded however
/// many writers queue behind a commit (an NBD client's whole queue).
#[test]
fn a_writer_finding_the_buffers_full_waits_for_the_commit_in_flight() {
    let domain = Domain::new();
    let config = FsConfig {
        dirty_limit: DIRTY_LIMIT,
        ..FsConfig::default()
    };
    let (fs, gate, arrived, verdict) = gated(&domain, &config);
    let (attr, fh) = fs
        .create(&root(), FileSystem::ROOT, b"full", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let held = pattern(DIRTY_LIMIT + 4096, 3);
    let fill = pattern(DIRTY_LIMIT, 5);
    let late = pattern(8192, 9);
    let fill_at = 2 * DIRTY_LIMIT as u64;
    let late_at = 4 * DIRTY_LIMIT as u64;
    gate.armed.store(attr.ino, Ordering::SeqCst);
    std::thread::scope(|scope| {
        let committer = scope.spawn(|| fs.write(fh, 0, &held));
        arrived.recv().unwrap();
        // Fills the buffers again: this writer then waits to commit them.
        let filler = scope.spawn(|| fs.write(fh, fill_at, &fill));
        while fs.read(fh, fill_at, 1).unwrap() != fill[..1] {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (done_tx, done) = mpsc::channel();
        let (fs, late) = (&fs, &late);
        let late_writer = scope.spawn(move || {
            let written = fs.write(fh, late_at, late);
            done_tx.send(()).unwrap();
            written
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let returned = done.try_recv().is_ok();
        let buffered = !fs.read(fh, late_at, late.len() as u32).unwrap().is_empty();
        // The verdict first, so that a failure below does not leave the
        // writers waiting for it.
        verdict.send(true).unwrap();
        committer.join().unwrap().unwrap();
        filler.join().unwrap().unwrap();
        late_writer.join().unwrap().unwrap();
        assert!(
            !returned,
            "a write into full buffers returned while the commit was held"
        );
        assert!(
            !buffered,
            "a write into full buffers was buffered while the commit was held"
        );
    });
    assert_eq!(fs.read(fh, late_at, late.len() as u32).unwrap(), late);
    assert_eq!(fs.read(fh, fill_at, fill.len() as u32).unwrap(), fill);
    assert_eq!(fs.read(fh, 0, held.len() as u32).unwrap(), held);
    fs.release(fh).unwrap();
}

/// A read fetches its records without the file's lock, against the leaves of
/// the tree it planned with. When a write of the same sector commits in
/// between, the record it fetches is newer than its leaf: the read must
/// return the old or the new data, never EIO.
#[test]
fn a_read_racing_a_commit_of_its_sector_returns_data_not_eio() {
    let domain = Domain::new();
    // No sector cache: the read must go to the store.
    let config = FsConfig {
        cache_seconds: 0,
        ..FsConfig::default()
    };
    let (fs, gate, _, _) = gated(&domain, &config);
    let (attr, fh) = fs
        .create(&root(), FileSystem::ROOT, b"raced", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let old = pattern(64 * 1024, 11);
    fs.write(fh, 0, &old).unwrap();
    fs.fsync(fh, false).unwrap();
    let at = 3 * 4096;
    let new = pattern(4096, 200);
    let (arrived, go) = gate.hold_read(attr.ino);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| fs.read(fh, at, 4096));
        // The reader has planned against the old tree and waits to fetch.
        arrived
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the read reached the store");
        fs.write(fh, at, &new).unwrap();
        fs.fsync(fh, false).unwrap();
        go.send(()).unwrap();
        let read = reader.join().unwrap().expect("a raced read is not EIO");
        let at = at as usize;
        assert!(
            read == new || read == old[at..at + 4096],
            "a raced read returned neither the old nor the new data"
        );
    });
    assert_eq!(fs.read(fh, at, 4096).unwrap(), new);
    fs.release(fh).unwrap();
}

/// Two commits of one file in flight: the second is prepared on the tree the
/// held first one left, once the store queued the first. Reads see both
/// layers; when the first lands the second lands on it, and when the first
/// is refused the store refuses the second too (its tree vouches for the
/// first's records). Either way nothing is lost: after fsync and a remount
/// the file reads as written.
fn two_commits_in_flight(store_first: bool) {
    let domain = Domain::new();
    let config = FsConfig {
        dirty_limit: DIRTY_LIMIT,
        ..FsConfig::default()
    };
    let (fs, gate, arrived, verdict) = gated(&domain, &config);
    let name = format!("layers-{store_first}");
    let (ino, fh, mut model) = stored_file(&fs, &name);
    let first = pattern(DIRTY_LIMIT + 5_000, 31);
    let second = pattern(DIRTY_LIMIT + 9_000, 57);
    let (first_at, second_at) = (100_000u64, 700_000u64);
    model_write(&mut model, first_at, &first);
    model_write(&mut model, second_at, &second);
    let (arrivals_tx, arrivals) = mpsc::channel();
    *gate.queued_arrivals.lock().unwrap() = Some(arrivals_tx);
    gate.queue_early.store(true, Ordering::SeqCst);
    gate.armed.store(ino, Ordering::SeqCst);
    std::thread::scope(|scope| {
        let first_writer = scope.spawn(|| fs.write(fh, first_at, &first));
        arrived.recv().unwrap();
        arrivals.recv().unwrap();
        // The store has queued the first commit: the second begins and waits
        // behind it.
        let second_writer = scope.spawn(|| fs.write(fh, second_at, &second));
        if arrivals
            .recv_timeout(std::time::Duration::from_secs(30))
            .is_err()
        {
            // Let the writers go before failing, or the scope waits forever.
            verdict.send(store_first).unwrap();
            panic!("the second commit did not begin while the first was held");
        }
        check_read(&fs, fh, &model, 0, u32::MAX, "with two commits in flight");
        check_holes(&fs, ino, &model, "with two commits in flight");
        // Over both layers, buffered on top of them.
        let late = pattern(20_000, 77);
        fs.write(fh, first_at + 4_000, &late).unwrap();
        model_write(&mut model, first_at + 4_000, &late);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fs.fallocate(&root(), ino, second_at + 8192, 16384, mode)
            .unwrap();
        model[(second_at + 8192) as usize..(second_at + 8192 + 16384) as usize].fill(0);
        check_read(&fs, fh, &model, 0, u32::MAX, "over two commits in flight");
        verdict.send(store_first).unwrap();
        let first_result = first_writer.join().unwrap();
        let second_result = second_writer.join().unwrap();
        assert_eq!(
            first_result.is_ok(),
            store_first,
            "the held commit: {first_result:?}"
        );
        assert_eq!(
            second_result.is_ok(),
            store_first,
            "the commit staged on the held one: {second_result:?}"
        );
    });
    gate.queue_early.store(false, Ordering::SeqCst);
    check_read(&fs, fh, &model, 0, u32::MAX, "after both commits ended");
    check_holes(&fs, ino, &model, "after both commits ended");
    check_after_remount(fs, gate, fh, (&domain, config), (&name, ino), &model);
}

#[test]
fn a_second_commit_in_flight_lands_on_the_first() {
    two_commits_in_flight(true);
}

#[test]
fn a_second_commit_in_flight_is_refused_with_the_first_and_nothing_is_lost() {
    two_commits_in_flight(false);
}

/// The store reports a batch queued while it counts the batch as proposed,
/// and a reader of the same file waits in the store for that count to come
/// down. A write into part of a sector reads the rest of it holding the
/// file's lock, so the report must not need that lock, or neither the write
/// nor the commit ever finishes.
#[test]
fn a_partial_write_reading_the_store_while_a_commit_is_queued_finishes() {
    let domain = Domain::new();
    // No sector cache: the partial write must read its sector from the store.
    let config = FsConfig {
        dirty_limit: DIRTY_LIMIT,
        cache_seconds: 0,
        ..FsConfig::default()
    };
    let (fs, gate, _, _) = gated(&domain, &config);
    let fs = Arc::new(fs);
    let (ino, fh, mut model) = stored_file(&fs, "queued-reader");
    let (arrived, go) = gate.hold_queued(ino);
    let (done_tx, done) = mpsc::channel();
    let big = pattern(DIRTY_LIMIT + 4096, 3);
    let patch = pattern(100, 9);
    model_write(&mut model, 1 << 20, &big);
    model_write(&mut model, 10, &patch);
    // Threads of their own, not scoped: a deadlock fails the test below
    // instead of hanging it.
    let committer = {
        let (fs, done_tx, big) = (fs.clone(), done_tx.clone(), big.clone());
        std::thread::spawn(move || {
            let written = fs.write(fh, 1 << 20, &big);
            done_tx
                .send(("the committing write", written.is_ok()))
                .unwrap();
        })
    };
    arrived
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the commit reached the store");
    let partial = {
        let (fs, patch) = (fs.clone(), patch.clone());
        std::thread::spawn(move || {
            let written = fs.write(fh, 10, &patch);
            done_tx
                .send(("the partial write", written.is_ok()))
                .unwrap();
        })
    };
    // The partial write now holds the file's lock and waits in the store.
    std::thread::sleep(std::time::Duration::from_millis(200));
    go.send(()).unwrap();
    for _ in 0..2 {
        let (what, ok) = done
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a write never finished: the queued report waited for the file's lock");
        assert!(ok, "{what} failed");
    }
    committer.join().unwrap();
    partial.join().unwrap();
    check_read(&fs, fh, &model, 0, u32::MAX, "after both writes");
    fs.release(fh).unwrap();
}

/// A commit of the staged namespace changes is held in the store while
/// namespace operations go on: creating, writing, renaming and looking up
/// files do not wait for it, and the held batch's new file reads as written.
/// Unlinking that file waits for the batch's outcome (whether a delete must
/// reach the store depends on it), then deletes it. After a remount the store
/// holds exactly what the operations left, whether the held batch was stored
/// or refused.
fn namespace_commit_in_flight(store_it: bool) {
    let domain = Domain::new();
    let config = FsConfig::default();
    let (fs, gate, arrived, verdict) = gated(&domain, &config);
    let flags = libc::O_RDWR;
    let (held, fh) = fs
        .create(&root(), FileSystem::ROOT, b"held", 0o644, 0, flags)
        .unwrap();
    fs.write(fh, 0, b"held bytes").unwrap();
    // A small new file is staged on close, to go with its directory entry.
    fs.release(fh).unwrap();
    gate.armed.store(held.ino, Ordering::SeqCst);
    let later = std::thread::scope(|scope| {
        let committer = scope.spawn(|| fs.commit_pending());
        arrived.recv().unwrap();
        let (done_tx, done) = mpsc::channel();
        let fs = &fs;
        let others = scope.spawn(move || {
            let (later, fh) = fs
                .create(&root(), FileSystem::ROOT, b"later", 0o644, 0, flags)
                .unwrap();
            fs.write(fh, 0, b"later bytes").unwrap();
            fs.release(fh).unwrap();
            fs.rename(
                &root(),
                FileSystem::ROOT,
                b"later",
                FileSystem::ROOT,
                b"renamed",
                RenameMode::Replace,
            )
            .unwrap();
            let found = fs.lookup(&root(), FileSystem::ROOT, b"held").unwrap();
            assert_eq!(found.ino, held.ino);
            let fh = fs.open(&root(), held.ino, libc::O_RDONLY).unwrap();
            assert_eq!(fs.read(fh, 0, 100).unwrap(), b"held bytes");
            fs.release(fh).unwrap();
            done_tx.send(()).unwrap();
            later.ino
        });
        if done.recv_timeout(Duration::from_secs(30)).is_err() {
            // Let the committer go before failing, or the scope waits forever.
            verdict.send(store_it).unwrap();
            panic!("namespace operations waited for the commit in flight");
        }
        let later = others.join().unwrap();
        let unlinker = scope.spawn(|| fs.unlink(&root(), FileSystem::ROOT, b"held"));
        std::thread::sleep(Duration::from_millis(200));
        let waited = !unlinker.is_finished();
        verdict.send(store_it).unwrap();
        let committed = committer.join().unwrap();
        assert_eq!(
            committed.is_ok(),
            store_it,
            "the held commit: {committed:?}"
        );
        unlinker.join().unwrap().unwrap();
        assert!(waited, "the unlink did not wait for the commit of its file");
        later
    });
    assert!(fs.lookup(&root(), FileSystem::ROOT, b"held").is_err());
    fs.sync_all().unwrap();
    drop(fs);
    drop(gate);
    let fs = domain.mount(config.clone());
    assert!(fs.resolve(&root(), "/held").is_err());
    assert_eq!(fs.resolve(&root(), "/renamed").unwrap(), later);
    let fh = fs.open(&root(), later, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, 100).unwrap(), b"later bytes");
    fs.release(fh).unwrap();
    drop(fs);
    // Neither the held batch nor the delete after it left the file behind.
    let service = open_service(
        &domain.data(),
        domain.creds.clone(),
        &Membership::Alone,
        &ServiceOptions::default(),
    )
    .unwrap();
    assert!(service.read_meta(held.ino).unwrap().is_none());
}

#[test]
fn namespace_operations_go_on_while_a_namespace_commit_is_stored() {
    namespace_commit_in_flight(true);
}

#[test]
fn namespace_operations_go_on_while_a_namespace_commit_is_refused() {
    namespace_commit_in_flight(false);
}
