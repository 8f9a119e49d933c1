//! First light: create, write, read back, remount.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use blocktree_fs::{FileSystem, FsConfig};
use common::*;

#[test]
fn write_read_remount() {
    let domain = Domain::new();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    {
        let fs = domain.mount(FsConfig::default());
        let (attr, fh) = fs
            .create(
                &root(),
                FileSystem::ROOT,
                b"hello",
                0o644,
                0o022,
                libc::O_RDWR,
            )
            .unwrap();
        assert_eq!(attr.size, 0);
        assert_eq!(fs.write(fh, 0, &data).unwrap(), data.len() as u32);
        assert_eq!(fs.read(fh, 10, 20).unwrap(), &data[10..30]);
        fs.fsync(fh, false).unwrap();
        fs.release(fh).unwrap();
        let entries = fs.readdir(&root(), FileSystem::ROOT, 0).unwrap();
        assert_eq!(entries.len(), 3);
    }
    let fs = domain.mount(FsConfig::default());
    let attr = fs.lookup(&root(), FileSystem::ROOT, b"hello").unwrap();
    assert_eq!(attr.size, data.len() as u64);
    let fh = fs.open(&root(), attr.ino, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, 200_000).unwrap(), data);
}

/// A new file waits for the staged commit while its buffers hold no more than
/// a small file; with a dirty limit that small, writes into buffers exactly at
/// the limit must still go through, and the file read back whole.
#[test]
fn a_new_file_with_its_buffers_at_a_small_limit_takes_more_writes() {
    let domain = Domain::new();
    let config = FsConfig {
        dirty_limit: 64 * 1024,
        ..FsConfig::default()
    };
    let fs = std::sync::Arc::new(domain.mount(config.clone()));
    let (_, fh) = fs
        .create(&root(), FileSystem::ROOT, b"small", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let data: Vec<u8> = (0..64 * 1024 + 4096).map(|i| (i % 239) as u8).collect();
    let (done_tx, done) = std::sync::mpsc::channel();
    // A thread of its own, so that a hung write fails the test instead of
    // hanging it.
    let writer = {
        let (fs, data) = (fs.clone(), data.clone());
        std::thread::spawn(move || {
            fs.write(fh, 0, &data[..64 * 1024]).unwrap();
            fs.write(fh, 64 * 1024, &data[64 * 1024..]).unwrap();
            done_tx.send(()).unwrap();
        })
    };
    let finished = done.recv_timeout(std::time::Duration::from_secs(20));
    assert!(finished.is_ok(), "a write into buffers at the limit hung");
    writer.join().unwrap();
    assert_eq!(fs.read(fh, 0, data.len() as u32).unwrap(), data);
    fs.fsync(fh, false).unwrap();
    fs.release(fh).unwrap();
    drop(fs);
    let fs = domain.mount(config);
    let attr = fs.lookup(&root(), FileSystem::ROOT, b"small").unwrap();
    let fh = fs.open(&root(), attr.ino, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, data.len() as u32 + 1).unwrap(), data);
}

/// Gathered writes (NBD's `write_many`) apply in order under one lock, commit
/// as they cross the dirty limit, and read back and survive a remount like
/// the same writes made one by one; a handle opened read-only refuses them all.
#[test]
fn gathered_writes_apply_in_order_across_the_dirty_limit() {
    let domain = Domain::new();
    let config = FsConfig {
        dirty_limit: 64 * 1024,
        ..FsConfig::default()
    };
    let fs = domain.mount(config.clone());
    let (attr, fh) = fs
        .create(
            &root(),
            FileSystem::ROOT,
            b"gathered",
            0o644,
            0,
            libc::O_RDWR,
        )
        .unwrap();
    let mut model = vec![0u8; 0];
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for i in 0..48u64 {
        // 4 KiB writes scattered over 256 KiB, overlapping, some unaligned.
        let offset = (i * 37 % 64) * 4096 + if i % 5 == 0 { 100 } else { 0 };
        writes.push((offset, vec![i as u8 + 1; 4096]));
    }
    for (offset, data) in &writes {
        let end = *offset as usize + data.len();
        if model.len() < end {
            model.resize(end, 0);
        }
        model[*offset as usize..end].copy_from_slice(data);
    }
    let refs: Vec<(u64, &[u8])> = writes
        .iter()
        .map(|(offset, data)| (*offset, data.as_slice()))
        .collect();
    let results = fs.write_many(fh, &refs);
    assert_eq!(results.len(), writes.len());
    for result in results {
        assert_eq!(result.unwrap(), 4096);
    }
    assert_eq!(fs.read(fh, 0, model.len() as u32).unwrap(), model);
    let read_only = fs.open(&root(), attr.ino, libc::O_RDONLY).unwrap();
    assert!(
        fs.write_many(read_only, &refs[..2])
            .iter()
            .all(Result::is_err)
    );
    fs.release(read_only).unwrap();
    fs.fsync(fh, false).unwrap();
    fs.release(fh).unwrap();
    drop(fs);
    let fs = domain.mount(config);
    let attr = fs.lookup(&root(), FileSystem::ROOT, b"gathered").unwrap();
    let fh = fs.open(&root(), attr.ino, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(fh, 0, model.len() as u32 + 1).unwrap(), model);
}
