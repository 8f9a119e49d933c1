//! `raft-node`: one member of a replicated sector service, driven over its
//! standard input. The process tests of `blocktree-raftlog` run several of
//! them on 127.0.0.1; operators can use it to try a cluster by hand.
//!
//! ```text
//! raft-node --data DIR --store MEMBER_STORE [--writer WRITER_STORE]
//!           [--listen ADDR] [--follower-reads] [--snapshot-every ENTRIES]
//!           [--write-timeout-ms MILLIS] [--append-delay-ms MILLIS]
//!           [--log-bytes BYTES] [--linearizable]
//!           (--create DIRECTORY_PATH GENERATION | --join PEER_ADDR PEER_PATH
//!            | --join-address PEER_ADDR | --open)
//! ```
//!
//! It prints `ready <addr> <node id>` and then answers one line per command:
//!
//! - `status` → `status <role> <leader|-> <term> <commit|-> <applied|-> <voters,..> <learners,..>`
//! - `write <files> <sectors> <sector bytes>` → `ok <inode>,..` or `err <reason>`:
//!   that many new files, each written by one batch signed by the writer.
//! - `check <inode> <sectors> <sector bytes>` → `ok` or `err <reason>`: the file
//!   holds what `write` put there (read locally with `--follower-reads`,
//!   linearizably when `--linearizable` follows it: on a follower, through
//!   a read index from the leader).
//! - `digest` → `digest <hex> <files>`: every sector the member stores.
//! - `scrub` → `scrub <checked> <corrupt> <repaired>`: finds sectors that
//!   fail their checksum and repairs them from another member.
//! - `bench <seconds> <sector bytes> <sectors> <threads> <seq|rand>` →
//!   `bench <writes> <bytes> <seconds>`: each thread overwrites sectors of a
//!   file of its own, one signed batch per sector (raftlog/benches/raft.sh).
//! - `snapshots` → `snapshots <n>`: snapshots received since start.
//! - `log-bytes` → `log-bytes <n>`: bytes of entries the log holds.
//! - `leave` → `ok` or `err <reason>`.
//!
//! The process exits when its standard input closes.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::BtPath;
use blocktree_core::credstore::{CredStore, FileCredStore, RuntimeSigner};
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::{FileMeta, MetaBody, MetaSecrets, SecretsPart};
use blocktree_core::readcap::{FileIds, ParentTable, ReadcapTable};
use blocktree_netstack::Credentials;
use blocktree_raftlog::service::{FileWrite, SectorBatch, SectorService};
use blocktree_raftlog::{GenerationInfo, RaftConfig, RaftService, ReadMode};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

enum Mode {
    Create(BtPath, u64),
    Join(SocketAddr, BtPath),
    JoinAddress(SocketAddr),
    Open,
}

struct Args {
    data: PathBuf,
    store: PathBuf,
    writer: Option<PathBuf>,
    listen: SocketAddr,
    follower_reads: bool,
    snapshot_every: Option<u64>,
    write_timeout_ms: Option<u64>,
    append_delay_ms: u64,
    log_bytes: Option<u64>,
    mode: Mode,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut data = None;
    let mut store = None;
    let mut writer = None;
    let mut listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut follower_reads = false;
    let mut snapshot_every = None;
    let mut write_timeout_ms = None;
    let mut append_delay_ms = 0;
    let mut log_bytes = None;
    let mut mode = None;
    let value = |args: &mut dyn Iterator<Item = String>, what: &str| {
        args.next().ok_or_else(|| anyhow!("{what} needs a value"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--data" => data = Some(PathBuf::from(value(&mut args, "--data")?)),
            "--store" => store = Some(PathBuf::from(value(&mut args, "--store")?)),
            "--writer" => writer = Some(PathBuf::from(value(&mut args, "--writer")?)),
            "--listen" => listen = value(&mut args, "--listen")?.parse()?,
            "--follower-reads" => follower_reads = true,
            "--write-timeout-ms" => {
                write_timeout_ms = Some(value(&mut args, "--write-timeout-ms")?.parse()?)
            }
            "--append-delay-ms" => {
                append_delay_ms = value(&mut args, "--append-delay-ms")?.parse()?
            }
            "--log-bytes" => log_bytes = Some(value(&mut args, "--log-bytes")?.parse()?),
            "--snapshot-every" => {
                snapshot_every = Some(value(&mut args, "--snapshot-every")?.parse()?)
            }
            "--create" => {
                let path = value(&mut args, "--create")?.parse()?;
                let generation = value(&mut args, "--create")?.parse()?;
                mode = Some(Mode::Create(path, generation));
            }
            "--join" => {
                let addr = value(&mut args, "--join")?.parse()?;
                let path = value(&mut args, "--join")?.parse()?;
                mode = Some(Mode::Join(addr, path));
            }
            "--join-address" => {
                let addr = value(&mut args, "--join-address")?.parse()?;
                mode = Some(Mode::JoinAddress(addr));
            }
            "--linearizable" => follower_reads = false,
            "--open" => mode = Some(Mode::Open),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        data: data.ok_or_else(|| anyhow!("--data is required"))?,
        store: store.ok_or_else(|| anyhow!("--store is required"))?,
        writer,
        listen,
        follower_reads,
        snapshot_every,
        write_timeout_ms,
        append_delay_ms,
        log_bytes,
        mode: mode.unwrap_or(Mode::Open),
    })
}

/// The contents of sector `index` of the file `inode` as `write` makes it.
fn sector_bytes(inode: u64, index: u64, len: usize) -> Vec<u8> {
    let seed = HashAlgorithm::Sha256.hash(&[&inode.to_le_bytes(), &index.to_le_bytes()]);
    seed.as_bytes().iter().copied().cycle().take(len).collect()
}

fn new_file(
    service: &RaftService,
    writer: &dyn CredStore,
    sectors: u64,
    sector_len: usize,
) -> Result<u64> {
    let inode = service.allocate_inode()?;
    let data: Vec<(u64, Vec<u8>)> = (0..sectors)
        .map(|index| (index, sector_bytes(inode, index, sector_len)))
        .collect();
    let leaves: Vec<_> = data
        .iter()
        .map(|(_, bytes)| MerkleTree::leaf_hash(HashAlgorithm::Sha256, bytes))
        .collect();
    let mut tree = MerkleTree::new(HashAlgorithm::Sha256);
    tree.update_leaf_hashes(
        leaves
            .into_iter()
            .enumerate()
            .map(|(i, leaf)| (i as u64, leaf))
            .collect::<Vec<_>>(),
    )?;
    sign_and_write(service, writer, inode, &tree, sector_len, data)?;
    Ok(inode)
}

/// Signs and writes `meta_for(tree)` with `data` for a file this writer owns.
fn sign_and_write(
    service: &RaftService,
    writer: &dyn CredStore,
    inode: u64,
    tree: &MerkleTree,
    sector_len: usize,
    data: Vec<(u64, Vec<u8>)>,
) -> Result<()> {
    let writecap = writer
        .writecap()
        .cloned()
        .ok_or_else(|| anyhow!("the writer store holds no writecap"))?;
    let body = MetaBody {
        ids: FileIds {
            generation: service.generation(),
            inode,
        },
        sector_size: sector_len as u32,
        hash_algorithm: HashAlgorithm::Sha256,
        merkle_root: tree.root(),
        sector_count: tree.leaf_count(),
        writer: writer.signing_public_key(),
        writecap,
        readcaps: ReadcapTable::default(),
        parents: ParentTable::default(),
        salt: [0; blocktree_core::readcap::SALT_LEN],
        keys: None,
        secrets: SecretsPart::Clear(MetaSecrets::default()),
    };
    let meta = FileMeta::sign(body, &RuntimeSigner(writer))?;
    service.write(SectorBatch {
        files: vec![FileWrite {
            meta,
            data,
            holes: Vec::new(),
        }],
        removes: Vec::new(),
    })?;
    Ok(())
}

/// `threads` writers, each overwriting sectors of its own file of `sectors`
/// sectors for `seconds`, sequentially or at random; returns (writes, bytes,
/// elapsed seconds).
fn bench(
    service: &RaftService,
    writer: &dyn CredStore,
    seconds: f64,
    sector_len: usize,
    sectors: u64,
    threads: usize,
    random: bool,
) -> Result<(u64, u64, f64)> {
    let hole = MerkleTree::leaf_hash(HashAlgorithm::Sha256, &[]);
    let mut files = Vec::new();
    for _ in 0..threads {
        let inode = service.allocate_inode()?;
        let mut tree = MerkleTree::new(HashAlgorithm::Sha256);
        tree.update_leaf_hashes([(sectors - 1, hole)])?;
        sign_and_write(service, writer, inode, &tree, sector_len, Vec::new())?;
        files.push((inode, tree));
    }
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs_f64(seconds);
    let results: Vec<Result<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .into_iter()
            .enumerate()
            .map(|(thread, (inode, mut tree))| {
                scope.spawn(move || -> Result<u64> {
                    let mut writes = 0u64;
                    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (thread as u64 + 1);
                    while std::time::Instant::now() < deadline {
                        let index = if random {
                            // xorshift: the benchmark's own cheap randomness.
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state % sectors
                        } else {
                            writes % sectors
                        };
                        let bytes = sector_bytes(inode, index ^ writes, sector_len);
                        tree.update_leaf_hashes([(
                            index,
                            MerkleTree::leaf_hash(HashAlgorithm::Sha256, &bytes),
                        )])?;
                        sign_and_write(
                            service,
                            writer,
                            inode,
                            &tree,
                            sector_len,
                            vec![(index, bytes)],
                        )?;
                        writes += 1;
                    }
                    Ok(writes)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a writer panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut writes = 0;
    for result in results {
        writes += result?;
    }
    Ok((writes, writes * sector_len as u64, elapsed))
}

fn check_file(service: &RaftService, inode: u64, sectors: u64, sector_len: usize) -> Result<()> {
    let meta = service
        .read_meta(inode)?
        .ok_or_else(|| anyhow!("inode {inode} is missing"))?;
    if meta.body().sector_count != sectors {
        bail!("inode {inode} has {} sectors", meta.body().sector_count);
    }
    let indices: Vec<u64> = (0..sectors).collect();
    let records = service.read_data(inode, &indices, None)?;
    for (index, record) in indices.iter().zip(records) {
        if record.as_deref() != Some(&sector_bytes(inode, *index, sector_len)[..]) {
            bail!("sector {index} of inode {inode} differs");
        }
    }
    Ok(())
}

fn ids(list: &[(u64, blocktree_raftlog::types::MemberNode)]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .map(|(id, _)| format!("{id:016x}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn opt(value: Option<u64>) -> String {
    value.map_or("-".into(), |value| value.to_string())
}

fn answer(service: &RaftService, writer: Option<&dyn CredStore>, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let result: Result<String> = (|| match words.as_slice() {
        ["status"] => {
            let status = service.status();
            Ok(format!(
                "status {} {} {} {} {} {} {}",
                status.role,
                status
                    .leader
                    .map_or("-".into(), |leader| format!("{leader:016x}")),
                status.term,
                opt(status.commit_index),
                opt(status.applied_index),
                ids(&status.voters),
                ids(&status.learners),
            ))
        }
        ["write", files, sectors, len] => {
            let writer = writer.ok_or_else(|| anyhow!("no --writer store"))?;
            let mut inodes = Vec::new();
            for _ in 0..files.parse::<u64>()? {
                inodes.push(new_file(service, writer, sectors.parse()?, len.parse()?)?.to_string());
            }
            Ok(format!("ok {}", inodes.join(",")))
        }
        ["check", inode, sectors, len] => {
            check_file(service, inode.parse()?, sectors.parse()?, len.parse()?)?;
            Ok("ok".into())
        }
        ["digest"] => {
            let (digest, files) = service.content_digest()?;
            Ok(format!("digest {digest} {files}"))
        }
        ["scrub"] => {
            let report = service.scrub()?;
            Ok(format!(
                "scrub {} {} {}",
                report.sectors_checked, report.corrupt, report.repaired
            ))
        }
        ["bench", seconds, len, sectors, threads, pattern] => {
            let writer = writer.ok_or_else(|| anyhow!("no --writer store"))?;
            let (writes, bytes, elapsed) = bench(
                service,
                writer,
                seconds.parse()?,
                len.parse()?,
                sectors.parse()?,
                threads.parse()?,
                *pattern == "rand",
            )?;
            Ok(format!("bench {writes} {bytes} {elapsed:.3}"))
        }
        ["snapshots"] => Ok(format!("snapshots {}", service.snapshots_installed())),
        ["log-bytes"] => Ok(format!("log-bytes {}", service.log_bytes())),
        ["leave"] => {
            service.leave()?;
            Ok("ok".into())
        }
        _ => Err(anyhow!("unknown command {line:?}")),
    })();
    match result {
        Ok(text) => text,
        Err(error) => format!("err {}", format!("{error:#}").replace('\n', " ")),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = parse_args()?;
    let store: Arc<dyn CredStore> = Arc::new(
        FileCredStore::open(&args.store)
            .with_context(|| format!("opening {}", args.store.display()))?,
    );
    let credentials = Credentials::from_store(store)?;
    let writer: Option<Box<dyn CredStore>> = match &args.writer {
        Some(dir) => Some(Box::new(
            FileCredStore::open(dir).with_context(|| format!("opening {}", dir.display()))?,
        )),
        None => None,
    };
    let mut config = RaftConfig::new(&args.data).networked(credentials, args.listen);
    if let Some(every) = args.snapshot_every {
        config.snapshot_every = every;
    }
    if let Some(millis) = args.write_timeout_ms {
        config.write_timeout = std::time::Duration::from_millis(millis);
    }
    config.append_delay = std::time::Duration::from_millis(args.append_delay_ms);
    if let Some(bytes) = args.log_bytes {
        config.log_bytes = bytes;
    }
    if args.follower_reads {
        config.read_mode = ReadMode::Follower;
    }
    config.engine = Arc::new(|dir| {
        let mut engine = blocktree_engine::EngineConfig::new(dir);
        engine.segment_bytes = 8 << 20;
        engine
    });
    let service = match args.mode {
        Mode::Create(directory, generation) => RaftService::create(
            config,
            GenerationInfo {
                generation,
                directory,
            },
        )?,
        Mode::Join(addr, path) => RaftService::join(config, addr, path)?,
        Mode::JoinAddress(addr) => RaftService::join_address(config, addr)?,
        Mode::Open => RaftService::open(config)?,
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "ready {} {:016x}",
        service
            .local_addr()
            .map_or("-".into(), |addr| addr.to_string()),
        service.node_id()
    )?;
    stdout.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = answer(&service, writer.as_deref(), &line);
        writeln!(stdout, "{reply}")?;
        stdout.flush()?;
    }
    Ok(())
}
