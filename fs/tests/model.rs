//! Random writes, truncates, hole punches and reads at random offsets and sizes,
//! mirrored on an in-memory model, with remounts in between: the file must always
//! read back byte for byte as the model says.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use blocktree_fs::{FileSystem, FsConfig, SetAttr};
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    Truncate { size: u64 },
    Punch { offset: u64, len: u64 },
    Read { offset: u64, len: u32 },
    Commit,
    Remount,
}

fn op(max: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..max, 1..40_000usize, any::<u8>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        1 => (0..max).prop_map(|size| Op::Truncate { size }),
        1 => (0..max, 1..30_000u64).prop_map(|(offset, len)| Op::Punch { offset, len }),
        4 => (0..max, 1..50_000u32).prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Commit),
        1 => Just(Op::Remount),
    ]
}

fn run(domain: &Domain, sector_size: u32, encrypted: bool, ops: &[Op]) {
    let config = FsConfig {
        sector_size,
        encrypt_root: encrypted,
        dirty_limit: 64 * 1024,
        ..FsConfig::default()
    };
    let mut fs = domain.mount(config.clone());
    let name = format!("model-{sector_size}-{encrypted}-{}", rand_suffix());
    let (attr, mut fh) = fs
        .create(
            &root(),
            FileSystem::ROOT,
            name.as_bytes(),
            0o644,
            0,
            libc::O_RDWR,
        )
        .unwrap();
    let ino = attr.ino;
    let mut model: Vec<u8> = Vec::new();
    for op in ops {
        match op {
            Op::Write { offset, len, seed } => {
                let data: Vec<u8> = (0..*len).map(|i| seed.wrapping_add(i as u8)).collect();
                fs.write(fh, *offset, &data).unwrap();
                let end = *offset as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[*offset as usize..end].copy_from_slice(&data);
            }
            Op::Truncate { size } => {
                fs.setattr(
                    &root(),
                    ino,
                    &SetAttr {
                        size: Some(*size),
                        ..SetAttr::default()
                    },
                )
                .unwrap();
                model.resize(*size as usize, 0);
            }
            Op::Punch { offset, len } => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                fs.fallocate(&root(), ino, *offset, *len, mode).unwrap();
                let start = (*offset as usize).min(model.len());
                let end = (*offset as usize + *len as usize).min(model.len());
                model[start..end].fill(0);
            }
            Op::Read { offset, len } => {
                let got = fs.read(fh, *offset, *len).unwrap();
                let start = (*offset as usize).min(model.len());
                let end = (*offset as usize + *len as usize).min(model.len());
                assert_eq!(got.len(), end - start, "read length at {offset}+{len}");
                assert!(got == model[start..end], "read content at {offset}+{len}");
            }
            Op::Commit => fs.fsync(fh, false).unwrap(),
            Op::Remount => {
                fs.release(fh).unwrap();
                fs.sync_all().unwrap();
                drop(fs);
                fs = domain.mount(config.clone());
                // As the kernel does after a mount: look the file up first.
                assert_eq!(fs.resolve(&root(), &format!("/{name}")).unwrap(), ino);
                fh = fs.open(&root(), ino, libc::O_RDWR).unwrap();
            }
        }
        assert_eq!(fs.getattr(&root(), ino).unwrap().size, model.len() as u64);
    }
    let all = fs.read(fh, 0, u32::MAX).unwrap();
    assert!(all == model, "final content");
    fs.release(fh).unwrap();
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn random_operations_match_the_model() {
    let domain = Domain::new();
    let mut runner = TestRunner::new(Config {
        cases: 10,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(
                prop_oneof![Just(512u32), Just(4096u32), Just(65536u32)],
                any::<bool>(),
                prop::collection::vec(op(300_000), 1..120),
            ),
            |(sector_size, encrypted, ops)| {
                run(&domain, sector_size, encrypted, &ops);
                Ok(())
            },
        )
        .unwrap();
}
