//! Shared helpers for the benchmarks in `benches/benches/`.
//!
//! Nothing here is timed: these build inputs (deterministic pseudo-random data and
//! index sets) and write small result files next to criterion's own output, so a
//! benchmark's scripts can read figures criterion does not record.

use std::io;
use std::path::{Path, PathBuf};

/// The data sector size the crypto benchmarks use: 16 KiB.
pub const SECTOR_BYTES: usize = 16 * 1024;

/// SplitMix64: a tiny, seedable, deterministic generator for benchmark inputs.
/// Not for anything that needs real randomness.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value uniform enough in `0..bound` for picking benchmark indices.
    ///
    /// # Panics
    /// If `bound` is 0.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "empty range");
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// Fills `buffer` with pseudo-random bytes.
    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; len];
    SplitMix64::new(seed).fill(&mut buffer);
    buffer
}

/// `count` distinct indices in `0..bound`, in the order drawn (not sorted).
///
/// # Panics
/// If `count > bound`.
pub fn distinct_indices(rng: &mut SplitMix64, count: usize, bound: u64) -> Vec<u64> {
    assert!(
        count as u64 <= bound,
        "cannot draw {count} distinct values below {bound}"
    );
    let mut seen = std::collections::HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let index = rng.below(bound);
        if seen.insert(index) {
            out.push(index);
        }
    }
    out
}

/// Where benchmarks write side results for their scripts: `$BLOCKTREE_BENCH_OUT`
/// if set, else `<workspace>/target/bench-results`.
pub fn results_dir() -> PathBuf {
    match std::env::var_os("BLOCKTREE_BENCH_OUT") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest
                .parent()
                .unwrap_or(manifest)
                .join("target/bench-results")
        }
    }
}

/// Writes `contents` to `name` in [`results_dir`], creating the directory.
pub fn write_result(name: &str, contents: &str) -> io::Result<PathBuf> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, contents)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_distinct_and_in_range() {
        let mut rng = SplitMix64::new(1);
        let indices = distinct_indices(&mut rng, 1024, 1 << 20);
        let set: std::collections::HashSet<_> = indices.iter().collect();
        assert_eq!(set.len(), 1024);
        assert!(indices.iter().all(|&i| i < 1 << 20));
    }
}
