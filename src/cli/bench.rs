//! `blocktree bench`: measure the sector engine (issue #3) the way fio measures a
//! disk.
//!
//! - `bench sectors` drives a fresh engine store with a fio-like workload: sector
//!   size, sequential or random, read/write/mixed, a queue depth per job, several
//!   independent jobs, optional flushes, and optionally the filesystem layer's
//!   crypto (seal + Merkle leaf and update per write; Merkle check + open per read).
//!   It reports MB/s, IOPS and latency percentiles as a table or as one JSON object.
//! - `bench index` measures the in-memory index: bytes of index per live sector
//!   after writing millions of tiny sectors, and how long reopening that store takes.
//!
//! Both create their store in `<dir>/blocktree-bench-<pid>` and remove it at the end
//! unless `--keep`, so a benchmark never touches a real store. `benches/engine.sh`
//! runs them side by side with fio; BENCHMARKS.md has the results.
//!
//! Queue depth is implemented per job with a [`FuturesUnordered`] of the engine's
//! [`Pending`] futures on one thread (`block_on`): the job keeps `qd` operations
//! outstanding and refills every slot that the completions already in have freed.
//! Under `--crypto` its writes are prepared (sealed, then leaf-hashed together)
//! four at a time, as the filesystem layer prepares a commit's sectors. Each job owns a
//! region of the working set (a file of its own, inode `job + 1`) and never has two
//! operations on one sector in flight, as the filesystem layer will not; that keeps
//! every read's Merkle check exact under `--crypto`.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::aead::SymmetricKey;
use blocktree_core::hash::{Digest, HashAlgorithm};
use blocktree_core::merkle::MerkleTree;
use blocktree_core::sector::{SectorId, SectorKind, SectorOpener, SectorSealer};
use blocktree_engine::{Engine, EngineConfig, EngineError, EngineStats, Pending, WriteBatch};
use clap::{Args, Subcommand, ValueEnum};
use futures::executor::block_on;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::output::Report;

/// The generation every benchmark store is created for.
const BENCH_GENERATION: u64 = 1;
/// The largest sector `bench sectors` writes: the engine's record limit is 1 MiB
/// plus room for the sealing overhead.
const MAX_SECTOR_SIZE: u64 = 1 << 20;
/// Prefill writes batches of about this many payload bytes, well inside one engine
/// chunk (2 MiB), so a batch is one group commit rather than many.
const PREFILL_BATCH_BYTES: usize = 512 << 10;
/// Prefill batches each job keeps in flight.
const PREFILL_DEPTH: usize = 8;
/// With --crypto, writes are prepared (sealed, then hashed together) at least this
/// many at a time, as the filesystem layer prepares a commit's sectors: four is
/// what the interleaved SHA-256 hashes at once (`blocktree_core::hash`). Writes
/// prepared beyond those asked for wait for a free place in the queue; their
/// latency counts from their preparation.
const PREPARE_TOGETHER: usize = 4;
/// How often the progress bar is redrawn (and its MB/s recomputed).
const PROGRESS_TICK: Duration = Duration::from_millis(250);
/// The most memory `--crypto`'s Merkle trees may take (the machines this runs on
/// have tens of GiB; the filesystem layer holds a file's tree the same way).
const MAX_TREE_BYTES: u64 = 4 << 30;
/// The Merkle tree hash the filesystem layer uses by default.
const TREE_HASH: HashAlgorithm = HashAlgorithm::Sha256;

/// Arguments of `blocktree bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Sector throughput and latency: a fio-like workload on a fresh engine store.
    #[command(long_about = SECTORS_ABOUT)]
    Sectors(SectorsArgs),
    /// Index memory per live sector and start-up time, with millions of tiny sectors.
    #[command(long_about = INDEX_ABOUT)]
    Index(IndexArgs),
}

const SECTORS_ABOUT: &str = "Sector throughput and latency: a fio-like workload on a fresh \
engine store in DIR/blocktree-bench-<pid>, removed at the end unless --keep.

Each of --jobs jobs keeps --qd operations in flight on its own share of the working set \
(--size bytes of --sector-size sectors): sequential jobs walk their share, random jobs pick \
uniformly in it. Reads (--rw read or mixed) need data, so the working set is written first \
(not measured). Latency is per operation, from its start (sealing included with --crypto) \
to its completion (Merkle check and opening included).

Sizes take binary suffixes: 4096, 4K, 64KiB, 1G. Durations: 10, 2.5, 10s, 1m.

Examples:
  blocktree bench sectors --dir /data --sector-size 64K --pattern seq --rw write --qd 16
  blocktree bench sectors --dir /data --sector-size 4K --pattern rand --rw read --qd 32
  blocktree bench sectors --dir /data --sector-size 4K --jobs 32 --qd 1 --flush-every 1
  blocktree bench sectors --dir /data --sector-size 64K --pattern seq --crypto --json";

const INDEX_ABOUT: &str = "Index memory per live sector and start-up time: writes --sectors \
tiny sectors (in big batches) to a fresh store in DIR/blocktree-bench-<pid>, reports the \
engine's index bytes per live sector, shuts the engine down and times Engine::open of the \
full store. With --drop-caches (root only) the page cache is dropped before a second, \
cold open, which is timed too.";

/// Sequential or random placement of a job's operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Pattern {
    /// Each job walks its own region in order, wrapping around.
    Seq,
    /// Each operation picks a sector uniformly at random in the job's region.
    Rand,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Rand => "rand",
        }
    }
}

/// What the operations do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ReadWrite {
    /// Only reads (the working set is written first).
    Read,
    /// Only writes.
    Write,
    /// Reads and writes, --mix percent reads (the working set is written first).
    Mixed,
}

impl ReadWrite {
    fn name(self) -> &'static str {
        match self {
            ReadWrite::Read => "read",
            ReadWrite::Write => "write",
            ReadWrite::Mixed => "mixed",
        }
    }
}

/// Arguments of `blocktree bench sectors`.
#[derive(Debug, Args)]
struct SectorsArgs {
    /// Directory to create the benchmark store in (as DIR/blocktree-bench-<pid>).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Bytes per sector: a multiple of 512, at most 1 MiB.
    #[arg(long, value_name = "BYTES", default_value = "4K", value_parser = parse_sector_size)]
    sector_size: u64,
    /// Working set: the sectors the benchmark touches, in bytes, shared out among
    /// the jobs.
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_bytes)]
    size: u64,
    /// Sequential or random placement.
    #[arg(long, value_enum, default_value_t = Pattern::Rand)]
    pattern: Pattern,
    /// Reads, writes or a mix of both.
    #[arg(long, value_enum, default_value_t = ReadWrite::Write)]
    rw: ReadWrite,
    /// Percent of operations that are reads, for --rw mixed (default 50).
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    mix: Option<u8>,
    /// Operations each job keeps in flight.
    #[arg(long, value_name = "N", default_value = "16", value_parser = parse_qd)]
    qd: usize,
    /// Independent jobs, each with its own queue depth and its own share of the
    /// working set.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_jobs)]
    jobs: usize,
    /// Seconds to measure (after the warm-up), e.g. 10, 2.5 or 1m.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    duration: Duration,
    /// Seconds to run before measuring.
    #[arg(long, value_name = "SECONDS", default_value = "0", value_parser = parse_seconds)]
    warmup: Duration,
    /// Make writes durable: 0 never, 1 every write (write_durable), N a flush after
    /// every N writes of a job.
    #[arg(long, value_name = "N", default_value_t = 0)]
    flush_every: u64,
    /// Seal every sector with AES-256-GCM and keep a SHA-256 Merkle tree per job (a
    /// leaf hash and a batched update per write), as the filesystem layer does; reads
    /// check the Merkle leaf and open the sector. Writes are prepared four at a time
    /// and leaf-hashed together; a write's latency counts from its preparation.
    #[arg(long)]
    crypto: bool,
    /// Write the whole working set before measuring (automatic for read and mixed).
    #[arg(long)]
    prefill: bool,
    /// Engine shards (threads); default: one per CPU.
    #[arg(long, value_name = "N", value_parser = parse_shards)]
    shards: Option<usize>,
    /// Buffered I/O instead of O_DIRECT.
    #[arg(long)]
    no_direct: bool,
    /// Print one JSON object on stdout instead of the table, and no progress bar.
    #[arg(long)]
    json: bool,
    /// Keep the benchmark store instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// Arguments of `blocktree bench index`.
#[derive(Debug, Args)]
struct IndexArgs {
    /// Directory to create the benchmark store in (as DIR/blocktree-bench-<pid>).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Sectors to write, e.g. 10000000, 10_000_000 or 10M (decimal suffixes).
    #[arg(long, value_name = "N", default_value = "10M", value_parser = parse_sector_count)]
    sectors: u64,
    /// Payload bytes per sector.
    #[arg(long, value_name = "BYTES", default_value = "16", value_parser = parse_tiny_payload)]
    payload_bytes: usize,
    /// Sectors per write batch while filling.
    #[arg(long, value_name = "N", default_value = "1024", value_parser = parse_index_batch)]
    batch: usize,
    /// Engine shards (threads); default: one per CPU.
    #[arg(long, value_name = "N", value_parser = parse_shards)]
    shards: Option<usize>,
    /// Buffered I/O instead of O_DIRECT.
    #[arg(long)]
    no_direct: bool,
    /// After the first (warm) reopen, drop the page cache and time a cold reopen
    /// (needs root: writes /proc/sys/vm/drop_caches).
    #[arg(long)]
    drop_caches: bool,
    /// Print one JSON object on stdout instead of the report, and no progress bar.
    #[arg(long)]
    json: bool,
    /// Keep the benchmark store instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// Runs `blocktree bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Sectors(args) => run_sectors(args),
        BenchCommand::Index(args) => run_index(args),
    }
}

// ---------------------------------------------------------------------------
// Flag parsing: every error is one line that names the rule.

/// Parses a byte count with an optional binary suffix: `4096`, `4K`, `4KiB`, `1.5G`.
/// K, M, G and T mean 1024-based units, as in fio, with or without `B`/`iB`.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "'{text}' is not a size (expected e.g. 4096, 4K, 64KiB, 1G)"
            ));
        }
    };
    let number = number.replace('_', "");
    let bytes = if number.contains('.') {
        let value: f64 = number
            .parse()
            .map_err(|_| format!("'{text}' is not a size (expected e.g. 4096, 4K, 64KiB, 1G)"))?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
            return Err(format!("'{text}' is not a whole number of bytes"));
        }
        bytes as u64
    } else {
        let value: u64 = number
            .parse()
            .map_err(|_| format!("'{text}' is not a size (expected e.g. 4096, 4K, 64KiB, 1G)"))?;
        value
            .checked_mul(1 << shift)
            .ok_or_else(|| format!("'{text}' is too large"))?
    };
    Ok(bytes)
}

/// A sector size: a multiple of 512 bytes, at most 1 MiB (also `mount --sector-size`).
pub(crate) fn parse_sector_size(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!(
            "sector size must be a multiple of 512 bytes, got {bytes}"
        ));
    }
    if bytes > MAX_SECTOR_SIZE {
        return Err(format!("sector size must be at most 1 MiB, got {bytes}"));
    }
    Ok(bytes)
}

/// Parses seconds as a plain number (`10`, `2.5`) or a humantime duration (`10s`, `1m`).
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("'{text}' is not a number of seconds ≥ 0"));
    }
    humantime::parse_duration(text)
        .map_err(|_| format!("'{text}' is not a duration (expected e.g. 10, 2.5, 10s or 1m)"))
}

/// Parses a whole number in `min..=max`, naming `what` in the error.
fn parse_in_range(text: &str, min: u64, max: u64, what: &str) -> Result<u64, String> {
    let value: u64 = text
        .trim()
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{what} must be a whole number, got '{text}'"))?;
    if !(min..=max).contains(&value) {
        return Err(format!(
            "{what} must be between {min} and {max}, got {value}"
        ));
    }
    Ok(value)
}

fn parse_qd(text: &str) -> Result<usize, String> {
    parse_in_range(text, 1, 4096, "queue depth").map(|value| value as usize)
}

fn parse_jobs(text: &str) -> Result<usize, String> {
    parse_in_range(text, 1, 1024, "jobs").map(|value| value as usize)
}

fn parse_shards(text: &str) -> Result<usize, String> {
    // The engine's own limit (record::MAX_SHARDS); its error would come later and
    // less plainly.
    parse_in_range(text, 1, 32, "shards").map(|value| value as usize)
}

fn parse_percent(text: &str) -> Result<u8, String> {
    parse_in_range(text, 0, 100, "read percent").map(|value| value as u8)
}

fn parse_tiny_payload(text: &str) -> Result<usize, String> {
    let bytes = parse_bytes(text)?;
    if !(1..=4096).contains(&bytes) {
        return Err(format!("payload must be 1 to 4096 bytes, got {bytes}"));
    }
    Ok(bytes as usize)
}

fn parse_index_batch(text: &str) -> Result<usize, String> {
    parse_in_range(text, 1, 65536, "batch").map(|value| value as usize)
}

/// Parses a sector count with an optional decimal suffix: `10000000`, `10_000_000`, `10M`.
fn parse_sector_count(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (number, multiplier) = match trimmed.char_indices().last() {
        Some((at, 'k' | 'K')) => (&trimmed[..at], 1_000),
        Some((at, 'm' | 'M')) => (&trimmed[..at], 1_000_000),
        _ => (trimmed, 1),
    };
    let count = parse_in_range(number, 1, u64::MAX / 1_000_000, "sector count").map_err(|_| {
        format!("sector count must be a positive number like 10000000 or 10M, got '{text}'")
    })?;
    Ok(count * multiplier)
}

// ---------------------------------------------------------------------------
// The benchmark store.

/// A fresh engine store in `<dir>/blocktree-bench-<pid>`, shut down and removed
/// (unless kept) when the benchmark ends, also when it ends with an error.
struct BenchStore {
    path: PathBuf,
    config: EngineConfig,
    engine: Option<Engine>,
    keep: bool,
}

impl BenchStore {
    fn create(
        dir: &Path,
        shards: Option<usize>,
        direct_io: bool,
        keep: bool,
    ) -> Result<BenchStore> {
        if !dir.is_dir() {
            bail!("--dir {} is not a directory", dir.display());
        }
        let path = dir.join(format!("blocktree-bench-{}", std::process::id()));
        // Claimed with create_dir, which fails if the path exists, so that a store
        // kept by an earlier run with the same pid is never reused or removed.
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create the benchmark store {}", path.display()))?;
        let mut config = EngineConfig::new(&path);
        if let Some(shards) = shards {
            config.shards = shards;
        }
        config.direct_io = direct_io;
        let mut store = BenchStore {
            path,
            config,
            engine: None,
            keep,
        };
        let engine = Engine::create(store.config.clone(), BENCH_GENERATION).with_context(|| {
            format!(
                "cannot create a benchmark store in {}",
                store.path.display()
            )
        })?;
        store.engine = Some(engine);
        Ok(store)
    }

    fn engine(&self) -> Result<&Engine> {
        self.engine
            .as_ref()
            .ok_or(EngineError::Closed)
            .map_err(Into::into)
    }

    /// Shuts the engine down (so the store is complete on disk) and forgets it.
    fn shut_down(&mut self) -> Result<()> {
        if let Some(engine) = self.engine.take() {
            engine.shutdown().with_context(|| {
                format!("cannot shut down the store in {}", self.path.display())
            })?;
        }
        Ok(())
    }

    /// Opens the (shut down) store again; returns how long `Engine::open` took.
    fn reopen(&mut self) -> Result<Duration> {
        self.shut_down()?;
        let started = Instant::now();
        let engine = Engine::open(self.config.clone())
            .with_context(|| format!("cannot reopen the store in {}", self.path.display()))?;
        let took = started.elapsed();
        self.engine = Some(engine);
        Ok(took)
    }

    /// Shuts down and removes the store unless kept; says where a kept store is.
    fn finish(mut self) -> Result<()> {
        self.shut_down()?;
        if self.keep {
            eprintln!("kept the benchmark store {}", self.path.display());
            return Ok(());
        }
        let removed = std::fs::remove_dir_all(&self.path)
            .with_context(|| format!("cannot remove the benchmark store {}", self.path.display()));
        // Nothing is left for Drop to do, whether or not removal worked.
        self.keep = true;
        removed
    }
}

impl Drop for BenchStore {
    fn drop(&mut self) {
        // Only on an error path: finish() already did this otherwise. Best effort,
        // the error being reported is the one that matters.
        if let Some(engine) = self.engine.take() {
            let _ = engine.shutdown();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// Latency histogram.

/// Exact below this many nanoseconds; above, this many buckets per power of two,
/// which bounds the relative error of a reported percentile by 1/128 (HDR-style).
const SUB_BUCKET_BITS: u32 = 7;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
const BUCKETS: usize = ((64 - SUB_BUCKET_BITS + 1) as usize) * SUB_BUCKETS as usize;

/// Operation latencies in nanoseconds, log-bucketed.
#[derive(Clone)]
struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl LatencyHistogram {
    fn new() -> LatencyHistogram {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }

    fn bucket(nanos: u64) -> usize {
        if nanos < SUB_BUCKETS {
            return nanos as usize;
        }
        let magnitude = 63 - nanos.leading_zeros();
        let shift = magnitude - SUB_BUCKET_BITS;
        ((u64::from(shift) + 1) * SUB_BUCKETS + (nanos >> shift) - SUB_BUCKETS) as usize
    }

    /// The smallest value of bucket `index`, and the bucket's width.
    fn bucket_range(index: usize) -> (u64, u64) {
        let index = index as u64;
        if index < SUB_BUCKETS {
            return (index, 1);
        }
        let shift = index / SUB_BUCKETS - 1;
        ((index % SUB_BUCKETS + SUB_BUCKETS) << shift, 1 << shift)
    }

    fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[Self::bucket(nanos)] += 1;
        self.total += 1;
        self.max = self.max.max(nanos);
    }

    fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The latency at `quantile` (0..=1), in microseconds; 0 when empty.
    fn quantile_us(&self, quantile: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((quantile * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = Self::bucket_range(index);
                // The middle of the bucket, never past the largest value seen.
                return (low + width / 2).min(self.max) as f64 / 1e3;
            }
        }
        self.max as f64 / 1e3
    }
}

// ---------------------------------------------------------------------------
// `bench sectors`: the plan.

/// The validated settings of one `bench sectors` run.
#[derive(Clone, Debug)]
struct Plan {
    sector_size: usize,
    /// Sectors in the working set.
    sectors: u64,
    pattern: Pattern,
    rw: ReadWrite,
    /// Percent of operations that read.
    read_percent: u8,
    qd: usize,
    jobs: usize,
    duration: Duration,
    warmup: Duration,
    flush_every: u64,
    crypto: bool,
    prefill: bool,
}

impl Plan {
    fn new(args: &SectorsArgs) -> Result<Plan> {
        let read_percent = match (args.rw, args.mix) {
            (ReadWrite::Mixed, mix) => mix.unwrap_or(50),
            (_, Some(_)) => bail!("--mix applies only to --rw mixed"),
            (ReadWrite::Read, None) => 100,
            (ReadWrite::Write, None) => 0,
        };
        if args.duration.is_zero() {
            bail!("--duration must be more than 0 seconds");
        }
        let sectors = args.size / args.sector_size;
        let needed = (args.jobs * args.qd) as u64;
        if sectors < needed {
            bail!(
                "--size {} bytes is {} of {} bytes, fewer than --jobs × --qd = {needed}: \
                 every operation in flight needs a sector of its own",
                args.size,
                plural(sectors, "sector"),
                args.sector_size
            );
        }
        // A SHA-256 tree keeps about two 32-byte digests per leaf.
        let tree_bytes = sectors.saturating_mul(64);
        if args.crypto && tree_bytes > MAX_TREE_BYTES {
            bail!(
                "--crypto keeps a Merkle tree of the whole working set in memory: {} sectors \
                 need about {}, more than {}; use a smaller --size or a larger --sector-size",
                group_digits(sectors),
                binary_size(tree_bytes),
                binary_size(MAX_TREE_BYTES)
            );
        }
        Ok(Plan {
            sector_size: args.sector_size as usize,
            sectors,
            pattern: args.pattern,
            rw: args.rw,
            read_percent,
            qd: args.qd,
            jobs: args.jobs,
            duration: args.duration,
            warmup: args.warmup,
            flush_every: args.flush_every,
            crypto: args.crypto,
            prefill: args.prefill || args.rw != ReadWrite::Write,
        })
    }

    /// The sectors of job `job`: an equal share, the first jobs taking one more
    /// when the working set does not divide evenly.
    fn region_len(&self, job: usize) -> u64 {
        let jobs = self.jobs as u64;
        self.sectors / jobs + u64::from((job as u64) < self.sectors % jobs)
    }
}

/// Counters the jobs update as they go, for the progress bar and for start-up.
#[derive(Default)]
struct Live {
    bytes: AtomicU64,
    ops: AtomicU64,
    prefill_bytes: AtomicU64,
    prefilled_jobs: AtomicUsize,
    /// Set when a job could not start: the others stop as soon as the start gate opens.
    abort: AtomicBool,
}

/// What every job shares.
struct RunContext {
    engine: Engine,
    plan: Plan,
    live: Live,
    /// Opened by the main thread once every job has prefilled and the prefill is
    /// flushed, so that all jobs measure at the same time.
    start: Gate,
}

// ---------------------------------------------------------------------------
// `bench sectors`: one job.

/// A small, fast generator for placement and payload bytes (SplitMix64): the
/// benchmark needs spread, not secrecy.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0), by multiply-high: no modulo bias worth
    /// measuring at these sizes.
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

/// The filesystem layer's per-file write crypto: the sealer of the file's epoch key
/// and the file's Merkle tree.
struct Sealing {
    sealer: SectorSealer,
    tree: MerkleTree,
}

/// A job's crypto under one fresh key: the sealing half, and the opener for reads.
fn job_crypto(region: u64) -> Result<(Sealing, SectorOpener)> {
    let key =
        SymmetricKey::generate().map_err(|error| anyhow!("cannot generate a key: {error}"))?;
    let sealer = SectorSealer::new(0, &key, 0)?;
    let mut opener = SectorOpener::new();
    opener.add_epoch(0, &key)?;
    let mut tree = MerkleTree::new(TREE_HASH);
    // Size the tree for the whole region up front (its last leaf a hole), as a
    // file of known length has it, so that no measured write pays for growing it.
    tree.update_leaf_hashes([(region - 1, MerkleTree::leaf_hash(TREE_HASH, &[]))])?;
    Ok((Sealing { sealer, tree }, opener))
}

/// One job: its region of the working set (a file of its own) and the state it
/// keeps while submitting operations.
struct Job {
    /// Opens records for the job's reads. Kept apart from `work` so that reads in
    /// flight can borrow it while the job goes on submitting.
    opener: Option<SectorOpener>,
    work: JobWork,
}

/// A job's mutable state.
struct JobWork {
    inode: u64,
    /// Sectors in the job's region, numbered from 0.
    region: u64,
    rng: SplitMix64,
    /// Random bytes, twice a sector long: a payload is a sector-long window into it
    /// at a random offset, stamped with a counter, so that payloads differ without
    /// generating random bytes for every write.
    template: Vec<u8>,
    /// A reusable plaintext buffer, sealed into a fresh record per write (its
    /// length is the sector size).
    plaintext: Vec<u8>,
    sealing: Option<Sealing>,
    /// The next sector of a sequential job.
    cursor: u64,
    /// One bit per sector of the region: an operation on it is in flight, or a write
    /// to it is prepared.
    busy: Vec<u64>,
    /// Writes prepared ahead (with --crypto), oldest first.
    prepared: std::collections::VecDeque<PreparedWrite>,
    writes: u64,
    writes_since_flush: u64,
}

/// A write whose record is made (sealed and hashed with --crypto) but not yet
/// handed to the engine; its sector is marked busy.
struct PreparedWrite {
    id: SectorId,
    slot: u64,
    /// The record and its Merkle leaf, or why preparing failed.
    stored: Result<(Vec<u8>, Option<Digest>), String>,
    /// When its preparation started: its latency counts from here.
    started: Instant,
}

/// Which kind of operation completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Flush,
}

/// An operation handed to the engine (or one that failed before it got there).
struct Op {
    submitted: Submitted,
    kind: OpKind,
    /// The sector in the job's region (none for a flush).
    slot: Option<u64>,
    started: Instant,
}

enum Submitted {
    Read {
        pending: Pending<Option<Vec<u8>>>,
        id: SectorId,
        /// The Merkle leaf the sector's record must hash to (with --crypto).
        expected_leaf: Option<Digest>,
    },
    Write(Pending<()>),
    Flush(Pending<()>),
    /// Preparing the operation failed (sealing, the Merkle update).
    Failed(String),
}

/// An operation that completed, successfully or not.
struct Completion {
    kind: OpKind,
    slot: Option<u64>,
    started: Instant,
    finished: Instant,
    outcome: Result<(), String>,
    /// The engine is shut down: submitting more would only fail faster.
    fatal: bool,
}

/// What one job measured (and, merged, what the run measured).
struct JobResult {
    all: LatencyHistogram,
    reads: LatencyHistogram,
    writes: LatencyHistogram,
    bytes: u64,
    errors: u64,
    flushes: u64,
    first_error: Option<String>,
}

impl JobResult {
    fn new() -> JobResult {
        JobResult {
            all: LatencyHistogram::new(),
            reads: LatencyHistogram::new(),
            writes: LatencyHistogram::new(),
            bytes: 0,
            errors: 0,
            flushes: 0,
            first_error: None,
        }
    }

    fn merge(&mut self, other: &JobResult) {
        self.all.merge(&other.all);
        self.reads.merge(&other.reads);
        self.writes.merge(&other.writes);
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.flushes += other.flushes;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    fn fail(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

impl Job {
    fn new(index: usize, plan: &Plan) -> Result<Job> {
        let region = plan.region_len(index);
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        let mut rng = SplitMix64(
            (u64::from(std::process::id()) << 32)
                ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ clock,
        );
        let template = (0..plan.sector_size * 2)
            .map(|_| rng.next() as u8)
            .collect();
        let (sealing, opener) = if plan.crypto {
            let (sealing, opener) = job_crypto(region)?;
            (Some(sealing), Some(opener))
        } else {
            (None, None)
        };
        Ok(Job {
            opener,
            work: JobWork {
                inode: index as u64 + 1,
                region,
                rng,
                template,
                plaintext: vec![0; plan.sector_size],
                sealing,
                cursor: 0,
                busy: vec![0; region.div_ceil(64) as usize],
                prepared: std::collections::VecDeque::new(),
                writes: 0,
                writes_since_flush: 0,
            },
        })
    }

    /// Runs the measured workload: the warm-up, then `duration` of recorded
    /// operations, keeping `qd` in flight throughout.
    fn measure(&mut self, context: &RunContext) -> JobResult {
        let Job { opener, work } = self;
        let opener = opener.as_ref();
        let plan = &context.plan;
        let size = plan.sector_size;
        let record_from = Instant::now() + plan.warmup;
        let stop_at = record_from + plan.duration;
        let mut result = JobResult::new();
        let mut stopped = false;
        let mut in_flight = FuturesUnordered::new();
        block_on(async {
            loop {
                if in_flight.len() < plan.qd && !stopped {
                    if Instant::now() >= stop_at {
                        stopped = true;
                    } else {
                        let free = plan.qd - in_flight.len();
                        for op in work.submit_up_to(context, free) {
                            in_flight.push(complete(op, size, opener));
                        }
                    }
                }
                let Some(done) = in_flight.next().await else {
                    break;
                };
                stopped |= account(done, work, context, &mut result, record_from, stop_at);
                // Every completion already in: the slots they free are refilled
                // together, so their writes are prepared together.
                while let Some(Some(done)) = in_flight.next().now_or_never() {
                    stopped |= account(done, work, context, &mut result, record_from, stop_at);
                }
            }
        });
        result
    }
}

/// Counts a completed operation into `result` (when it completed inside the
/// measured window) and the live counters; frees its sector. True when the engine
/// is shut down.
fn account(
    done: Completion,
    work: &mut JobWork,
    context: &RunContext,
    result: &mut JobResult,
    record_from: Instant,
    stop_at: Instant,
) -> bool {
    if let Some(slot) = done.slot {
        work.set_busy(slot, false);
    }
    let bytes = match done.kind {
        OpKind::Flush => 0,
        OpKind::Read | OpKind::Write => context.plan.sector_size as u64,
    };
    if done.outcome.is_ok() {
        context.live.bytes.fetch_add(bytes, Ordering::Relaxed);
        context.live.ops.fetch_add(1, Ordering::Relaxed);
    }
    // Operations count by completion time: one that completes inside the window
    // counts, with its whole latency.
    if done.finished < record_from || done.finished > stop_at {
        return done.fatal;
    }
    let latency = done.finished - done.started;
    match (done.outcome, done.kind) {
        (Err(error), _) => result.fail(error),
        (Ok(()), OpKind::Flush) => result.flushes += 1,
        (Ok(()), kind) => {
            result.all.record(latency);
            result.bytes += bytes;
            match kind {
                OpKind::Read => result.reads.record(latency),
                _ => result.writes.record(latency),
            }
        }
    }
    done.fatal
}

impl JobWork {
    fn sector_id(&self, slot: u64) -> SectorId {
        SectorId {
            generation: BENCH_GENERATION,
            inode: self.inode,
            sector: SectorKind::Data(slot),
        }
    }

    fn is_busy(&self, slot: u64) -> bool {
        self.busy[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    fn set_busy(&mut self, slot: u64, busy: bool) {
        let word = &mut self.busy[(slot / 64) as usize];
        if busy {
            *word |= 1 << (slot % 64);
        } else {
            *word &= !(1 << (slot % 64));
        }
    }

    /// The next sector to operate on: the next free one in order, or a random free
    /// one. One is always free: fewer than `qd` ≤ `region` operations are in flight.
    fn next_slot(&mut self, pattern: Pattern) -> u64 {
        loop {
            let slot = match pattern {
                Pattern::Seq => {
                    let slot = self.cursor;
                    self.cursor = (self.cursor + 1) % self.region;
                    slot
                }
                Pattern::Rand => self.rng.below(self.region),
            };
            if !self.is_busy(slot) {
                return slot;
            }
        }
    }

    /// The bytes to store as each of `ids`, freshly made: the sealed records and
    /// their Merkle leaves with --crypto (hashed together, as the filesystem layer
    /// hashes a commit's records), else the plaintexts themselves.
    fn stored_records(&mut self, ids: &[SectorId]) -> Result<Vec<(Vec<u8>, Option<Digest>)>> {
        let size = self.plaintext.len();
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let offset = self.rng.below(size as u64) as usize;
            self.writes += 1;
            let stamp = self.writes.to_le_bytes();
            let stamped = stamp.len().min(size);
            match &self.sealing {
                Some(sealing) => {
                    self.plaintext
                        .copy_from_slice(&self.template[offset..offset + size]);
                    self.plaintext[..stamped].copy_from_slice(&stamp[..stamped]);
                    records.push(sealing.sealer.seal_to_vec(id, &self.plaintext)?);
                }
                None => {
                    // One copy, straight into the vector the engine takes.
                    let mut payload = self.template[offset..offset + size].to_vec();
                    payload[..stamped].copy_from_slice(&stamp[..stamped]);
                    records.push(payload);
                }
            }
        }
        let leaves: Vec<Option<Digest>> = match self.sealing {
            Some(_) => {
                let views: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
                MerkleTree::leaf_hashes(TREE_HASH, &views)
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            None => vec![None; records.len()],
        };
        Ok(records.into_iter().zip(leaves).collect())
    }

    /// Writes the job's whole region in big batches, several in flight, with one
    /// batched Merkle update per batch under --crypto.
    fn prefill(&mut self, context: &RunContext) -> Result<()> {
        let size = context.plan.sector_size;
        let per_batch = (PREFILL_BATCH_BYTES / size).max(1) as u64;
        let mut in_flight = FuturesUnordered::new();
        let mut next = 0;
        block_on(async {
            loop {
                while in_flight.len() < PREFILL_DEPTH && next < self.region {
                    let end = (next + per_batch).min(self.region);
                    let mut batch = WriteBatch::new();
                    let mut leaves = Vec::new();
                    let ids: Vec<SectorId> = (next..end).map(|slot| self.sector_id(slot)).collect();
                    for ((slot, id), (bytes, leaf)) in
                        (next..end).zip(ids.iter()).zip(self.stored_records(&ids)?)
                    {
                        batch.put(*id, bytes);
                        leaves.extend(leaf.map(|leaf| (slot, leaf)));
                    }
                    if let Some(sealing) = &mut self.sealing {
                        sealing.tree.update_leaf_hashes(leaves)?;
                    }
                    let bytes = (end - next) * size as u64;
                    let pending = context.engine.write(batch);
                    in_flight.push(async move { pending.await.map(|()| bytes) });
                    next = end;
                }
                let Some(written) = in_flight.next().await else {
                    return Ok(());
                };
                let bytes = written.context("a prefill write failed")?;
                context
                    .live
                    .prefill_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
        })
    }

    /// Prepares up to `count` operations and hands them to the engine. The writes
    /// among them are prepared together (sealed, then hashed at once), each still
    /// its own one-sector batch and Merkle update.
    fn submit_up_to(&mut self, context: &RunContext, count: usize) -> Vec<Op> {
        let plan = &context.plan;
        let engine = &context.engine;
        let started = Instant::now();
        let mut ops = Vec::with_capacity(count);
        let mut writes = Vec::new();
        for _ in 0..count {
            if plan.flush_every > 1 && self.writes_since_flush >= plan.flush_every {
                // The flush covers the writes decided before it.
                self.submit_writes(context, &mut writes, started, &mut ops);
                self.writes_since_flush = 0;
                ops.push(Op {
                    submitted: Submitted::Flush(engine.flush()),
                    kind: OpKind::Flush,
                    slot: None,
                    started,
                });
                continue;
            }
            let read = match plan.read_percent {
                0 => false,
                100 => true,
                percent => self.rng.below(100) < u64::from(percent),
            };
            if !read {
                self.writes_since_flush += 1;
                match self.next_write(plan.pattern) {
                    Ok(write) => ops.push(self.submit_prepared(context, write)),
                    Err(fresh) => writes.push(fresh),
                }
                continue;
            }
            let slot = self.next_slot(plan.pattern);
            self.set_busy(slot, true);
            let id = self.sector_id(slot);
            let expected_leaf = self
                .sealing
                .as_ref()
                .and_then(|sealing| sealing.tree.leaf(slot));
            ops.push(Op {
                submitted: Submitted::Read {
                    pending: engine.read(id),
                    id,
                    expected_leaf,
                },
                kind: OpKind::Read,
                slot: Some(slot),
                started,
            });
        }
        self.submit_writes(context, &mut writes, started, &mut ops);
        ops
    }

    /// The next write: one prepared ahead, or a free sector picked now (then
    /// prepared by [`submit_writes`](Self::submit_writes)).
    fn next_write(&mut self, pattern: Pattern) -> Result<PreparedWrite, (SectorId, u64)> {
        if let Some(write) = self.prepared.pop_front() {
            return Ok(write);
        }
        let slot = self.next_slot(pattern);
        self.set_busy(slot, true);
        Err((self.sector_id(slot), slot))
    }

    /// Prepares `writes` together and hands each to the engine, emptying `writes`.
    /// With --crypto, it prepares at least [`PREPARE_TOGETHER`] writes, keeping
    /// those not asked for in `prepared` (when the region has room for them).
    fn submit_writes(
        &mut self,
        context: &RunContext,
        writes: &mut Vec<(SectorId, u64)>,
        started: Instant,
        ops: &mut Vec<Op>,
    ) {
        if writes.is_empty() {
            return;
        }
        let asked = writes.len();
        // At most PREPARE_TOGETHER - 1 writes wait prepared (more are prepared only
        // once they are used up), so with this much room `next_slot` always finds a
        // free sector.
        let room = context.plan.qd as u64 + PREPARE_TOGETHER as u64 <= self.region;
        if self.sealing.is_some() && room {
            while writes.len() < PREPARE_TOGETHER {
                let slot = self.next_slot(context.plan.pattern);
                self.set_busy(slot, true);
                writes.push((self.sector_id(slot), slot));
            }
        }
        let ids: Vec<SectorId> = writes.iter().map(|(id, _)| *id).collect();
        let stored: Vec<Result<_, String>> = match self.stored_records(&ids) {
            Ok(records) => records.into_iter().map(Ok).collect(),
            Err(error) => {
                let message = format!("sealing failed: {error:#}");
                ids.iter().map(|_| Err(message.clone())).collect()
            }
        };
        for (position, ((id, slot), stored)) in writes.drain(..).zip(stored).enumerate() {
            let write = PreparedWrite {
                id,
                slot,
                stored,
                started,
            };
            if position < asked {
                ops.push(self.submit_prepared(context, write));
            } else {
                self.prepared.push_back(write);
            }
        }
    }

    /// Hands a prepared write to the engine.
    fn submit_prepared(&mut self, context: &RunContext, write: PreparedWrite) -> Op {
        let submitted = match write.stored {
            Ok((bytes, leaf)) => self.submit_write(context, write.id, write.slot, bytes, leaf),
            Err(message) => Submitted::Failed(message),
        };
        Op {
            submitted,
            kind: OpKind::Write,
            slot: Some(write.slot),
            started: write.started,
        }
    }

    fn submit_write(
        &mut self,
        context: &RunContext,
        id: SectorId,
        slot: u64,
        bytes: Vec<u8>,
        leaf: Option<Digest>,
    ) -> Submitted {
        if let (Some(sealing), Some(leaf)) = (&mut self.sealing, leaf) {
            // This write is a batch of one sector, so its batched Merkle update has
            // one leaf.
            if let Err(error) = sealing.tree.update_leaf_hashes([(slot, leaf)]) {
                return Submitted::Failed(format!("the Merkle update failed: {error}"));
            }
        }
        let mut batch = WriteBatch::new();
        batch.put(id, bytes);
        Submitted::Write(if context.plan.flush_every == 1 {
            context.engine.write_durable(batch)
        } else {
            context.engine.write(batch)
        })
    }
}

/// Why an operation failed.
enum OpError {
    Engine(EngineError),
    Check(String),
}

/// Waits for an operation and checks what it returned.
async fn complete(op: Op, sector_size: usize, opener: Option<&SectorOpener>) -> Completion {
    let outcome = match op.submitted {
        Submitted::Write(pending) | Submitted::Flush(pending) => {
            pending.await.map_err(OpError::Engine)
        }
        Submitted::Failed(message) => Err(OpError::Check(message)),
        Submitted::Read {
            pending,
            id,
            expected_leaf,
        } => match pending.await {
            Ok(Some(stored)) => {
                check_read(&id, &stored, expected_leaf, sector_size, opener).map_err(OpError::Check)
            }
            Ok(None) => Err(OpError::Check(format!(
                "{} read back nothing",
                describe(&id)
            ))),
            Err(error) => Err(OpError::Engine(error)),
        },
    };
    let finished = Instant::now();
    Completion {
        kind: op.kind,
        slot: op.slot,
        started: op.started,
        finished,
        fatal: matches!(outcome, Err(OpError::Engine(EngineError::Closed))),
        outcome: outcome.map_err(|error| match error {
            OpError::Engine(error) => error.to_string(),
            OpError::Check(message) => message,
        }),
    }
}

fn describe(id: &SectorId) -> String {
    match id.sector {
        SectorKind::Data(index) => format!("sector {index} of inode {}", id.inode),
        other => format!("{other:?} sector of inode {}", id.inode),
    }
}

/// Checks a sector read back: with --crypto, that its record hashes to the Merkle
/// leaf the job holds and opens under the job's key; always, that it has the
/// sector's length.
fn check_read(
    id: &SectorId,
    stored: &[u8],
    expected_leaf: Option<Digest>,
    sector_size: usize,
    opener: Option<&SectorOpener>,
) -> Result<(), String> {
    let plaintext_len = match opener {
        Some(opener) => {
            if expected_leaf != Some(MerkleTree::leaf_hash(TREE_HASH, stored)) {
                return Err(format!("{} does not match its Merkle leaf", describe(id)));
            }
            opener
                .open_to_vec(id, stored)
                .map_err(|error| error.to_string())?
                .len()
        }
        None => stored.len(),
    };
    if plaintext_len != sector_size {
        return Err(format!(
            "{} read back {plaintext_len} bytes, not {sector_size}",
            describe(id)
        ));
    }
    Ok(())
}

/// A job's thread: set up, prefill, wait for the start, measure.
fn job_thread(index: usize, context: Arc<RunContext>) -> Result<JobResult> {
    let mut check_in = CheckIn {
        live: &context.live,
        counted: false,
    };
    let prepared = Job::new(index, &context.plan).and_then(|mut job| {
        if context.plan.prefill {
            job.work.prefill(&context)?;
        }
        Ok(job)
    });
    if prepared.is_err() {
        context.live.abort.store(true, Ordering::SeqCst);
    }
    check_in.count();
    context.start.wait();
    let mut job = prepared.with_context(|| format!("benchmark job {index} could not start"))?;
    if context.live.abort.load(Ordering::SeqCst) {
        // Another job failed to start; the main thread reports its error.
        return Ok(JobResult::new());
    }
    Ok(job.measure(&context))
}

/// Counts a job as done preparing exactly once, also when it panics on the way,
/// so that the main thread never waits for a job that is gone.
struct CheckIn<'a> {
    live: &'a Live,
    counted: bool,
}

impl CheckIn<'_> {
    fn count(&mut self) {
        if !self.counted {
            self.counted = true;
            self.live.prefilled_jobs.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for CheckIn<'_> {
    fn drop(&mut self) {
        if !self.counted {
            // Only a panic gets here before counting: the run cannot go on.
            self.live.abort.store(true, Ordering::SeqCst);
            self.count();
        }
    }
}

// ---------------------------------------------------------------------------
// `bench sectors`: the run.

fn run_sectors(args: SectorsArgs) -> Result<()> {
    let plan = Plan::new(&args)?;
    let store = BenchStore::create(&args.dir, args.shards, !args.no_direct, args.keep)?;
    let context = Arc::new(RunContext {
        engine: store.engine()?.clone(),
        plan: plan.clone(),
        live: Live::default(),
        start: Gate::default(),
    });
    let show_progress = !args.json && std::io::stderr().is_terminal();

    let mut jobs = Vec::with_capacity(plan.jobs);
    let mut spawn_error = None;
    for index in 0..plan.jobs {
        let job_context = Arc::clone(&context);
        match std::thread::Builder::new()
            .name(format!("bench-job-{index}"))
            .spawn(move || job_thread(index, job_context))
        {
            Ok(handle) => jobs.push(handle),
            Err(error) => {
                context.live.abort.store(true, Ordering::SeqCst);
                spawn_error = Some(anyhow!("cannot start benchmark job {index}: {error}"));
                break;
            }
        }
    }

    // Prefill (each job its own region), then one flush so that measuring starts on
    // a quiet engine.
    let bar = progress_bar(
        show_progress && plan.prefill,
        plan.sectors * plan.sector_size as u64,
        "prefill  [{bar:32}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
    );
    while context.live.prefilled_jobs.load(Ordering::SeqCst) < jobs.len() {
        bar.set_position(context.live.prefill_bytes.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(50));
    }
    bar.finish_and_clear();
    let mut start_error = spawn_error;
    if plan.prefill
        && !context.live.abort.load(Ordering::SeqCst)
        && let Err(error) = context.engine.flush().wait()
    {
        context.live.abort.store(true, Ordering::SeqCst);
        start_error = Some(anyhow!(error).context("flushing the prefill failed"));
    }
    context.start.open();

    show_run_progress(show_progress, &plan, &context.live, &jobs);
    let mut total = JobResult::new();
    let mut job_error = None;
    for (index, handle) in jobs.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(result)) => total.merge(&result),
            Ok(Err(error)) => {
                job_error.get_or_insert(error);
            }
            Err(_) => {
                job_error.get_or_insert(anyhow!("benchmark job {index} panicked"));
            }
        }
    }
    if let Some(error) = start_error.or(job_error) {
        return Err(error);
    }

    let stats = context
        .engine
        .stats()
        .context("cannot read the engine's stats")?;
    let report = SectorsReport::new(&plan, &store, &total, &stats);
    if args.json {
        print_json(&report)?;
    } else {
        report.print_table()?;
    }
    store.finish()?;
    if let Some(error) = &total.first_error {
        if report.ops == 0 {
            bail!("no operation succeeded in the measured window: {error}");
        }
        eprintln!(
            "warning: {} operations failed; the first: {error}",
            total.errors
        );
    }
    Ok(())
}

/// A one-way gate the jobs wait at until the main thread opens it.
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        while !*open {
            open = self
                .opened
                .wait(open)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.opened.notify_all();
    }
}

/// A progress bar on stderr, or a hidden one when `show` is false.
fn progress_bar(show: bool, length: u64, template: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Shows elapsed/total seconds and the live MB/s and IOPS until every job is done.
fn show_run_progress(show: bool, plan: &Plan, live: &Live, jobs: &[JoinHandle<Result<JobResult>>]) {
    if !show {
        return;
    }
    let total = plan.warmup + plan.duration;
    let bar = progress_bar(
        true,
        total.as_millis() as u64,
        "{prefix:8} [{bar:32}] {msg}",
    );
    let begun = Instant::now();
    let (mut last_time, mut last_bytes, mut last_ops) = (begun, 0, 0);
    while jobs.iter().any(|job| !job.is_finished()) {
        std::thread::sleep(PROGRESS_TICK);
        let now = Instant::now();
        let elapsed = now - begun;
        let (bytes, ops) = (
            live.bytes.load(Ordering::Relaxed),
            live.ops.load(Ordering::Relaxed),
        );
        let seconds = (now - last_time).as_secs_f64();
        let rate = (bytes - last_bytes) as f64 / seconds / 1e6;
        let iops = (ops - last_ops) as f64 / seconds;
        (last_time, last_bytes, last_ops) = (now, bytes, ops);
        bar.set_prefix(if elapsed < plan.warmup {
            "warm-up"
        } else {
            "measure"
        });
        bar.set_position((elapsed.as_millis() as u64).min(total.as_millis() as u64));
        bar.set_message(format!(
            "{:.1}/{:.1} s  {rate:.1} MB/s  {} IOPS",
            elapsed.as_secs_f64().min(total.as_secs_f64()),
            total.as_secs_f64(),
            group_digits(iops as u64)
        ));
    }
    bar.finish_and_clear();
}

// ---------------------------------------------------------------------------
// `bench sectors`: the report.

/// Throughput and latency of one kind of operation.
#[derive(Debug, Serialize)]
struct KindReport {
    ops: u64,
    mb_per_s: f64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

impl KindReport {
    fn new(histogram: &LatencyHistogram, sector_size: usize, seconds: f64) -> KindReport {
        KindReport {
            ops: histogram.total,
            mb_per_s: (histogram.total * sector_size as u64) as f64 / seconds / 1e6,
            iops: histogram.total as f64 / seconds,
            p50_us: histogram.quantile_us(0.50),
            p99_us: histogram.quantile_us(0.99),
            p999_us: histogram.quantile_us(0.999),
            max_us: histogram.max as f64 / 1e3,
        }
    }
}

/// The engine's view of the store after the run.
#[derive(Debug, Serialize)]
struct StatsReport {
    live_sectors: u64,
    live_bytes: u64,
    disk_bytes: u64,
    segments: u64,
    index_bytes: u64,
    moved_bytes: u64,
    sync_rounds: u64,
    dsync_chunks: u64,
}

impl From<&EngineStats> for StatsReport {
    fn from(stats: &EngineStats) -> StatsReport {
        StatsReport {
            live_sectors: stats.live_sectors,
            live_bytes: stats.live_bytes,
            disk_bytes: stats.disk_bytes,
            segments: stats.segments,
            index_bytes: stats.index_bytes,
            moved_bytes: stats.moved_bytes,
            sync_rounds: stats.sync_rounds,
            dsync_chunks: stats.dsync_chunks,
        }
    }
}

/// Everything `bench sectors` reports; `--json` prints it as one object.
#[derive(Debug, Serialize)]
struct SectorsReport {
    mb_per_s: f64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    ops: u64,
    bytes: u64,
    errors: u64,
    duration_s: f64,
    warmup_s: f64,
    sector_size: usize,
    size: u64,
    sectors: u64,
    pattern: &'static str,
    rw: &'static str,
    read_percent: u8,
    qd: usize,
    jobs: usize,
    crypto: bool,
    flush_every: u64,
    flushes: u64,
    prefill: bool,
    shards: usize,
    direct_io: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    read: Option<KindReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    write: Option<KindReport>,
    engine: StatsReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kept_store: Option<PathBuf>,
}

impl SectorsReport {
    fn new(
        plan: &Plan,
        store: &BenchStore,
        total: &JobResult,
        stats: &EngineStats,
    ) -> SectorsReport {
        let seconds = plan.duration.as_secs_f64();
        let all = KindReport::new(&total.all, plan.sector_size, seconds);
        let reads = plan.rw != ReadWrite::Write;
        let writes = plan.rw != ReadWrite::Read;
        SectorsReport {
            mb_per_s: total.bytes as f64 / seconds / 1e6,
            iops: all.iops,
            p50_us: all.p50_us,
            p99_us: all.p99_us,
            p999_us: all.p999_us,
            max_us: all.max_us,
            ops: all.ops,
            bytes: total.bytes,
            errors: total.errors,
            duration_s: seconds,
            warmup_s: plan.warmup.as_secs_f64(),
            sector_size: plan.sector_size,
            size: plan.sectors * plan.sector_size as u64,
            sectors: plan.sectors,
            pattern: plan.pattern.name(),
            rw: plan.rw.name(),
            read_percent: plan.read_percent,
            qd: plan.qd,
            jobs: plan.jobs,
            crypto: plan.crypto,
            flush_every: plan.flush_every,
            flushes: total.flushes,
            prefill: plan.prefill,
            shards: store.config.shards,
            direct_io: store.config.direct_io,
            read: reads.then(|| KindReport::new(&total.reads, plan.sector_size, seconds)),
            write: writes.then(|| KindReport::new(&total.writes, plan.sector_size, seconds)),
            engine: StatsReport::from(stats),
            first_error: total.first_error.clone(),
            kept_store: store.keep.then(|| store.path.clone()),
        }
    }

    fn print_table(&self) -> Result<()> {
        let mut header = Report::new();
        header
            .field(
                "workload",
                format!(
                    "{} {}{}, {} sectors, {} × QD {}",
                    self.pattern,
                    self.rw,
                    if self.rw == "mixed" {
                        format!(" ({}% reads)", self.read_percent)
                    } else {
                        String::new()
                    },
                    binary_size(self.sector_size as u64),
                    plural(self.jobs as u64, "job"),
                    self.qd
                ),
            )
            .field(
                "working set",
                format!(
                    "{} ({} sectors){}",
                    binary_size(self.size),
                    group_digits(self.sectors),
                    if self.prefill { ", prefilled" } else { "" }
                ),
            )
            .field(
                "run",
                format!(
                    "{:.1} s measured after {:.1} s of warm-up; crypto {}; flush {}",
                    self.duration_s,
                    self.warmup_s,
                    if self.crypto {
                        "on (AES-256-GCM seal/open, SHA-256 Merkle)"
                    } else {
                        "off"
                    },
                    match self.flush_every {
                        0 => "never".to_owned(),
                        1 => "every write (durable writes)".to_owned(),
                        n => format!(
                            "after every {n} writes ({} flushes)",
                            group_digits(self.flushes)
                        ),
                    }
                ),
            )
            .field(
                "engine",
                format!(
                    "{} shards, {}; {} live sectors, {} on disk in {}, index {}, {} moved by compaction",
                    self.shards,
                    if self.direct_io {
                        "O_DIRECT"
                    } else {
                        "buffered I/O"
                    },
                    group_digits(self.engine.live_sectors),
                    binary_size(self.engine.disk_bytes),
                    plural(self.engine.segments, "segment"),
                    binary_size(self.engine.index_bytes),
                    binary_size(self.engine.moved_bytes)
                ),
            );
        header.print()?;

        let mut rows = Vec::new();
        if let Some(read) = &self.read {
            rows.push((
                "read",
                read,
                if self.write.is_some() { 0 } else { self.errors },
            ));
        }
        if let Some(write) = &self.write {
            rows.push((
                "write",
                write,
                if self.read.is_some() { 0 } else { self.errors },
            ));
        }
        let all = KindReport {
            ops: self.ops,
            mb_per_s: self.mb_per_s,
            iops: self.iops,
            p50_us: self.p50_us,
            p99_us: self.p99_us,
            p999_us: self.p999_us,
            max_us: self.max_us,
        };
        if rows.len() > 1 {
            rows.push(("total", &all, self.errors));
        }
        let mut stdout = std::io::stdout().lock();
        let mut table = format!(
            "\n{:<6} {:>10} {:>10} {:>9} {:>9} {:>10} {:>12} {:>7}\n",
            "", "MB/s", "IOPS", "p50 µs", "p99 µs", "p99.9 µs", "ops", "errors"
        );
        for (name, kind, errors) in rows {
            table.push_str(&format!(
                "{name:<6} {:>10.1} {:>10} {:>9.1} {:>9.1} {:>10.1} {:>12} {:>7}\n",
                kind.mb_per_s,
                group_digits(kind.iops.round() as u64),
                kind.p50_us,
                kind.p99_us,
                kind.p999_us,
                group_digits(kind.ops),
                group_digits(errors)
            ));
        }
        stdout
            .write_all(table.as_bytes())
            .and_then(|()| stdout.flush())
            .context("cannot write to standard output")
    }
}

fn print_json(value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string(value).context("cannot encode the results as JSON")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .context("cannot write to standard output")
}

/// `1234567` as `1,234,567`.
fn group_digits(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (position, digit) in digits.chars().enumerate() {
        if position > 0 && (digits.len() - position).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// Bytes in binary units: `4 KiB`, `1.00 GiB`.
fn binary_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{} {noun}s", group_digits(count))
    }
}

// ---------------------------------------------------------------------------
// `bench index`.

/// Fill batches each filling thread keeps in flight.
const FILL_DEPTH: usize = 4;

/// Everything `bench index` reports; `--json` prints it as one object.
#[derive(Debug, Serialize)]
struct IndexReport {
    sectors: u64,
    payload_bytes: usize,
    batch: usize,
    shards: usize,
    direct_io: bool,
    fill_s: f64,
    fill_sectors_per_s: f64,
    live_sectors: u64,
    index_bytes: u64,
    index_bytes_per_sector: f64,
    /// Growth of the process's resident memory during the fill, per sector: a
    /// cross-check of the engine's own index accounting (it includes everything
    /// else the fill allocated, so it is an upper bound).
    rss_growth_bytes_per_sector: Option<f64>,
    disk_bytes: u64,
    segments: u64,
    /// Engine::open of the full store, its files still in the page cache.
    open_s: f64,
    /// Engine::open after dropping the page cache (with --drop-caches).
    open_cold_s: Option<f64>,
    live_sectors_after_open: u64,
    index_bytes_after_open: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    kept_store: Option<PathBuf>,
}

fn run_index(args: IndexArgs) -> Result<()> {
    let mut store = BenchStore::create(&args.dir, args.shards, !args.no_direct, args.keep)?;
    let engine = store.engine()?.clone();
    let show_progress = !args.json && std::io::stderr().is_terminal();

    let rss_before = resident_bytes();
    let fill_started = Instant::now();
    fill_index(&engine, &args, show_progress)?;
    engine
        .flush()
        .wait()
        .context("flushing the filled store failed")?;
    let fill = fill_started.elapsed();
    let filled = engine.stats().context("cannot read the engine's stats")?;
    let rss_after = resident_bytes();
    if filled.live_sectors != args.sectors {
        bail!(
            "the engine reports {} live sectors after {} were written",
            filled.live_sectors,
            args.sectors
        );
    }
    drop(engine);

    let open = store.reopen()?;
    let reopened = store
        .engine()?
        .stats()
        .context("cannot read the engine's stats")?;
    if reopened.live_sectors != args.sectors {
        bail!(
            "the reopened engine reports {} live sectors, not {}",
            reopened.live_sectors,
            args.sectors
        );
    }
    spot_check(store.engine()?, &args)?;
    let open_cold = if args.drop_caches {
        store.shut_down()?;
        std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .context("--drop-caches needs root: cannot write /proc/sys/vm/drop_caches")?;
        Some(store.reopen()?)
    } else {
        None
    };

    let sectors = args.sectors as f64;
    let report = IndexReport {
        sectors: args.sectors,
        payload_bytes: args.payload_bytes,
        batch: args.batch,
        shards: store.config.shards,
        direct_io: store.config.direct_io,
        fill_s: fill.as_secs_f64(),
        fill_sectors_per_s: sectors / fill.as_secs_f64(),
        live_sectors: filled.live_sectors,
        index_bytes: filled.index_bytes,
        index_bytes_per_sector: filled.index_bytes as f64 / sectors,
        rss_growth_bytes_per_sector: rss_before
            .zip(rss_after)
            .map(|(before, after)| after.saturating_sub(before) as f64 / sectors),
        disk_bytes: filled.disk_bytes,
        segments: filled.segments,
        open_s: open.as_secs_f64(),
        open_cold_s: open_cold.map(|took| took.as_secs_f64()),
        live_sectors_after_open: reopened.live_sectors,
        index_bytes_after_open: reopened.index_bytes,
        kept_store: store.keep.then(|| store.path.clone()),
    };
    if args.json {
        print_json(&report)?;
    } else {
        let mut text = Report::new();
        text.field(
            "filled",
            format!(
                "{} sectors of {} in {:.2} s ({} sectors/s), batches of {}",
                group_digits(report.sectors),
                binary_size(report.payload_bytes as u64),
                report.fill_s,
                group_digits(report.fill_sectors_per_s as u64),
                group_digits(report.batch as u64)
            ),
        )
        .field(
            "engine",
            format!(
                "{} shards, {}; {} on disk in {}",
                report.shards,
                if report.direct_io {
                    "O_DIRECT"
                } else {
                    "buffered I/O"
                },
                binary_size(report.disk_bytes),
                plural(report.segments, "segment")
            ),
        )
        .field(
            "index",
            format!(
                "{} for {} live sectors: {:.1} bytes per sector",
                binary_size(report.index_bytes),
                group_digits(report.live_sectors),
                report.index_bytes_per_sector
            ),
        );
        if let Some(growth) = report.rss_growth_bytes_per_sector {
            text.field(
                "resident memory growth",
                format!(
                    "{growth:.1} bytes per sector during the fill (everything, not only the index)"
                ),
            );
        }
        text.field("open (warm cache)", format!("{:.3} s", report.open_s));
        if let Some(cold) = report.open_cold_s {
            text.field("open (cold cache)", format!("{cold:.3} s"));
        }
        text.print()?;
    }
    store.finish()
}

/// The payload of tiny sector `index`: its index, repeated to `len` bytes.
fn tiny_payload(index: u64, len: usize) -> Vec<u8> {
    index
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

fn tiny_sector(index: u64) -> SectorId {
    SectorId {
        generation: BENCH_GENERATION,
        inode: 1,
        sector: SectorKind::Data(index),
    }
}

/// Writes `args.sectors` tiny sectors in batches from one thread per CPU (hashing
/// and routing happen on the caller's thread), several batches in flight each.
fn fill_index(engine: &Engine, args: &IndexArgs, show_progress: bool) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |count| count.get())
        .min(args.sectors as usize)
        .max(1) as u64;
    let filled = AtomicU64::new(0);
    let bar = progress_bar(
        show_progress,
        args.sectors,
        "fill     [{bar:32}] {human_pos}/{human_len} sectors {per_sec}",
    );
    let result = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let start = args.sectors * thread / threads;
                let end = args.sectors * (thread + 1) / threads;
                let filled = &filled;
                scope.spawn(move || fill_range(engine, args, start..end, filled))
            })
            .collect();
        while workers.iter().any(|worker| !worker.is_finished()) {
            bar.set_position(filled.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a fill thread panicked")))
            })
            .collect::<Result<Vec<()>>>()
    });
    bar.finish_and_clear();
    result.map(drop)
}

fn fill_range(
    engine: &Engine,
    args: &IndexArgs,
    range: std::ops::Range<u64>,
    filled: &AtomicU64,
) -> Result<()> {
    let mut in_flight = FuturesUnordered::new();
    let mut next = range.start;
    block_on(async {
        loop {
            while in_flight.len() < FILL_DEPTH && next < range.end {
                let end = (next + args.batch as u64).min(range.end);
                let mut batch = WriteBatch::new();
                for index in next..end {
                    batch.put(tiny_sector(index), tiny_payload(index, args.payload_bytes));
                }
                let count = end - next;
                let pending = engine.write(batch);
                in_flight.push(async move { pending.await.map(|()| count) });
                next = end;
            }
            let Some(written) = in_flight.next().await else {
                return Ok(());
            };
            let count = written.context("a fill write failed")?;
            filled.fetch_add(count, Ordering::Relaxed);
        }
    })
}

/// Reads a few sectors of the reopened store back, so that a fast open is also a
/// correct one.
fn spot_check(engine: &Engine, args: &IndexArgs) -> Result<()> {
    for index in [0, args.sectors / 2, args.sectors - 1] {
        let stored = engine
            .read(tiny_sector(index))
            .wait()
            .with_context(|| format!("reading sector {index} after reopening failed"))?;
        if stored.as_deref() != Some(&tiny_payload(index, args.payload_bytes)[..]) {
            bail!("sector {index} reads back wrong after reopening the store");
        }
    }
    Ok(())
}

/// The process's resident memory, from /proc/self/status (None where unavailable).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("4K"), Ok(4096));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5M"), Ok(3 << 19));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("0.3").is_err());
    }

    #[test]
    fn sector_sizes_must_be_multiples_of_512() {
        assert_eq!(parse_sector_size("4K"), Ok(4096));
        assert!(
            parse_sector_size("1000")
                .unwrap_err()
                .contains("multiple of 512")
        );
        assert!(parse_sector_size("0").is_err());
        assert!(
            parse_sector_size("2M")
                .unwrap_err()
                .contains("at most 1 MiB")
        );
    }

    #[test]
    fn durations_and_counts_parse() {
        assert_eq!(parse_seconds("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_seconds("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_seconds("-1").is_err());
        assert_eq!(parse_qd("32"), Ok(32));
        assert!(parse_qd("0").unwrap_err().contains("queue depth"));
        assert_eq!(parse_sector_count("10M"), Ok(10_000_000));
        assert_eq!(parse_sector_count("10_000"), Ok(10_000));
        assert!(parse_sector_count("0").is_err());
    }

    #[test]
    fn histogram_buckets_round_trip_within_one_percent() {
        for value in [
            0u64,
            1,
            127,
            128,
            129,
            1000,
            65_535,
            1 << 20,
            123_456_789,
            u64::MAX / 3,
        ] {
            let (low, width) = LatencyHistogram::bucket_range(LatencyHistogram::bucket(value));
            assert!(low <= value && value < low.saturating_add(width), "{value}");
            assert!(width as f64 <= (low as f64 / 64.0).max(1.0), "{value}");
        }
        assert!(LatencyHistogram::bucket(u64::MAX) < BUCKETS);
    }

    #[test]
    fn histogram_percentiles() {
        let mut histogram = LatencyHistogram::new();
        for micros in 1..=1000 {
            histogram.record(Duration::from_micros(micros));
        }
        let p50 = histogram.quantile_us(0.5);
        let p99 = histogram.quantile_us(0.99);
        assert!((p50 - 500.0).abs() < 5.0, "{p50}");
        assert!((p99 - 990.0).abs() < 10.0, "{p99}");
        assert!(histogram.quantile_us(1.0) <= 1000.0);
        assert_eq!(LatencyHistogram::new().quantile_us(0.5), 0.0);
    }

    #[test]
    fn regions_share_out_the_working_set() {
        let args = SectorsArgs {
            dir: PathBuf::from("."),
            sector_size: 4096,
            size: 4096 * 10,
            pattern: Pattern::Rand,
            rw: ReadWrite::Write,
            mix: None,
            qd: 1,
            jobs: 3,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            flush_every: 0,
            crypto: false,
            prefill: false,
            shards: None,
            no_direct: false,
            json: false,
            keep: false,
        };
        let plan = Plan::new(&args).unwrap();
        let lens: Vec<u64> = (0..3).map(|job| plan.region_len(job)).collect();
        assert_eq!(lens, [4, 3, 3]);
        let too_deep = SectorsArgs { qd: 4, ..args };
        assert!(
            Plan::new(&too_deep)
                .unwrap_err()
                .to_string()
                .contains("--jobs × --qd")
        );
    }

    #[test]
    fn digits_group_and_sizes_read() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(1234), "1,234");
        assert_eq!(group_digits(1_234_567), "1,234,567");
        assert_eq!(binary_size(4096), "4 KiB");
        assert_eq!(binary_size(1536), "1.50 KiB");
    }
}
