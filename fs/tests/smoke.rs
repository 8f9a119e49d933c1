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
