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
