//! Sequential and random throughput of the filesystem service without FUSE:
//! `cargo run --release -p blocktree-fs --example throughput -- DIR [MiB]`.
//! A quick look at the data path's ceiling (sealing, hashing, verification and
//! the engine); the benchmarks that count are in `benches/`.

// An example: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

use blocktree_core::BtPath;
use blocktree_core::credstore::{CredStore, FileCredStore, KdfParams};
use blocktree_core::provision::{self, WritecapRequest};
use blocktree_core::time::Timestamp;
use blocktree_fs::{Caller, FileSystem, FsConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: throughput DIR [MiB]"));
    let mib: u64 = args.next().map_or(256, |text| text.parse().unwrap());
    let mut store = FileCredStore::create(dir.join("credentials"))
        .unwrap()
        .with_kdf_params(KdfParams {
            memory_kib: 8 * 1024,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap();
    let root = store.generate_root("password").unwrap();
    let domain = BtPath::root_of(root.principal());
    let request = WritecapRequest::new(&store, Some(domain.clone())).unwrap();
    let now = Timestamp::now();
    let writecap = {
        let signer = store.root_signer("password").unwrap();
        provision::approve(
            &request,
            &*signer,
            None,
            Some(domain),
            now.after(Duration::from_secs(3600)),
            now,
        )
        .unwrap()
    };
    store.set_writecap(writecap).unwrap();
    let creds: Arc<dyn CredStore> = Arc::new(store);
    let fs = blocktree_fs::local::open_local(&dir, creds, FsConfig::default()).unwrap();
    let caller = Caller::root();
    let (_, fh) = fs
        .create(&caller, FileSystem::ROOT, b"big", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let chunk = vec![0x5Au8; 1 << 20];
    let started = Instant::now();
    for i in 0..mib {
        fs.write(fh, i << 20, &chunk).unwrap();
    }
    fs.fsync(fh, false).unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    println!("sequential write: {:.0} MiB/s", mib as f64 / elapsed);
    let started = Instant::now();
    for i in 0..mib {
        let data = fs.read(fh, i << 20, 1 << 20).unwrap();
        assert_eq!(data.len(), 1 << 20);
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "sequential read (sector cache mostly cold): {:.0} MiB/s",
        mib as f64 / elapsed
    );
    let count = 20_000u64;
    let started = Instant::now();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..count {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % (mib * 256)) * 4096;
        fs.write(fh, offset, &chunk[..4096]).unwrap();
    }
    fs.fsync(fh, false).unwrap();
    println!(
        "random 4 KiB writes: {:.0} IOPS",
        count as f64 / started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    for _ in 0..count {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % (mib * 256)) * 4096;
        fs.read(fh, offset, 4096).unwrap();
    }
    println!(
        "random 4 KiB reads: {:.0} IOPS",
        count as f64 / started.elapsed().as_secs_f64()
    );
}
