//! The replicated service's benchmarks (issue #7), run by `raftlog/benches/raft.sh`
//! (ignored in ordinary test runs: they measure, they do not check
//! correctness). Each prints one `bench:` line per figure; the script collects
//! them into BENCHMARKS.md's format.
//!
//! - replicated write throughput: three members against one member, in the
//!   same run on the same file system: 64 KiB sequential and 4 KiB random
//!   overwrites, each a signed batch through Raft, 16 writers
//!   (`RAFT_BENCH_WRITERS`), best of 3 alternating repetitions
//!   (`RAFT_BENCH_REPS`);
//! - failover: from the leader's SIGKILL to the next committed write, 20 runs;
//! - catch-up: a new member joining a cluster holding `RAFT_BENCH_SNAPSHOT_MIB`
//!   (default 1024) by streamed snapshot while writes go on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Domain, Member, Start, inodes, spec};
// `inodes` parses the snapshot bench's writes.
use std::time::{Duration, Instant};

fn leader_of(members: &mut [Member]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for at in 0..members.len() {
            let status = members[at].status();
            if let Some(leader) = status.leader
                && status.applied.is_some()
                && let Some(index) = members.iter().position(|member| member.id == leader)
            {
                return index;
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cluster(domain: &Domain, writer: &std::path::Path, size: usize, prefix: &str) -> Vec<Member> {
    let first = spec(domain, &format!("{prefix}1"), writer);
    let mut members = vec![Member::start(&first, Start::Create { generation: 5 })];
    leader_of(&mut members);
    for n in 2..=size {
        let spec = spec(domain, &format!("{prefix}{n}"), writer);
        members.push(Member::start(
            &spec,
            Start::Join {
                addr: first.addr,
                path: first.path.clone(),
            },
        ));
    }
    members
}

/// MiB/s of `bench` on the leader.
fn throughput(members: &mut [Member], len: usize, pattern: &str) -> f64 {
    let at = leader_of(members);
    let sectors = if len >= 65536 { 256 } else { 4096 };
    let threads: usize = std::env::var("RAFT_BENCH_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let reply = members[at].ask(&format!("bench 5 {len} {sectors} {threads} {pattern}"));
    let words: Vec<&str> = reply.split_whitespace().collect();
    assert_eq!(words[0], "bench", "{reply}");
    let bytes: f64 = words[2].parse().unwrap();
    let seconds: f64 = words[3].parse().unwrap();
    bytes / seconds / (1 << 20) as f64
}

#[test]
#[ignore = "a benchmark: run by raftlog/benches/raft.sh"]
fn bench_replicated_writes_against_one_member() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let reps: usize = std::env::var("RAFT_BENCH_REPS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    for (len, pattern, label) in [(65536, "seq", "64KiB-seq"), (4096, "rand", "4KiB-rand")] {
        // One member and three alternate, `reps` times; the best of each side.
        let (mut best_single, mut best_replicated, mut ratios) = (0f64, 0f64, Vec::new());
        for rep in 0..reps {
            let mut one = cluster(&domain, &writer, 1, &format!("one-{label}-{rep}-"));
            let single = throughput(&mut one, len, pattern);
            drop(one);
            let mut three = cluster(&domain, &writer, 3, &format!("three-{label}-{rep}-"));
            let replicated = throughput(&mut three, len, pattern);
            drop(three);
            best_single = best_single.max(single);
            best_replicated = best_replicated.max(replicated);
            ratios.push(format!("{:.2}", replicated / single));
        }
        println!(
            "bench: {label} one-member {best_single:.1} MiB/s, three members \
             {best_replicated:.1} MiB/s, ratio {:.2} (per-rep ratios {})",
            best_replicated / best_single,
            ratios.join(" ")
        );
    }
}

#[test]
#[ignore = "a benchmark: run by raftlog/benches/raft.sh"]
fn bench_failover() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let mut members = cluster(&domain, &writer, 3, "f");
    let mut times = Vec::new();
    for _ in 0..20 {
        let mut at = leader_of(&mut members);
        while !members[at].ask("write 2 1 4096").starts_with("ok") {
            std::thread::sleep(Duration::from_millis(20));
            at = leader_of(&mut members);
        }
        let killed = members.remove(at).kill();
        let started = Instant::now();
        'write: loop {
            for member in members.iter_mut() {
                if member.ask("write 1 1 4096").starts_with("ok") {
                    break 'write;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no failover");
            std::thread::sleep(Duration::from_millis(5));
        }
        times.push(started.elapsed());
        members.push(Member::start(&killed, Start::Open));
        // Let the restarted member catch up before the next kill.
        std::thread::sleep(Duration::from_millis(1500));
    }
    times.sort();
    println!(
        "bench: failover SIGKILL-to-next-commit over {} runs: p50 {:?}, p99 (max) {:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() - 1]
    );
}

#[test]
#[ignore = "a benchmark: run by raftlog/benches/raft.sh"]
fn bench_snapshot_catch_up() {
    let mib: u64 = std::env::var("RAFT_BENCH_SNAPSHOT_MIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1024);
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let mut first = spec(&domain, "c1", &writer);
    first.extra = vec!["--snapshot-every".into(), "64".into()];
    let mut leader = Member::start(&first, Start::Create { generation: 3 });
    leader_of(std::slice::from_mut(&mut leader));
    let filled = Instant::now();
    for _ in 0..mib / 8 {
        inodes(&leader.ask("write 8 16 65536"));
    }
    let fill = filled.elapsed();
    let mut joiner = spec(&domain, "c2", &writer);
    joiner.extra = first.extra.clone();
    let started = Instant::now();
    let join = {
        let (addr, path) = (first.addr, first.path.clone());
        let mut joining = Member::spawn(&joiner, Start::Join { addr, path });
        std::thread::spawn(move || {
            joining.wait_ready();
            joining
        })
    };
    let mut during = 0;
    while !join.is_finished() {
        if leader.ask("write 1 4 4096").starts_with("ok") {
            during += 1;
        }
        // A steady load, not a flood: the disk is shared.
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no catch-up in 300 s"
        );
    }
    let elapsed = started.elapsed();
    let mut joined = join.join().unwrap();
    let snapshots = joined.ask("snapshots");
    println!(
        "bench: catch-up of {mib} MiB (filled in {fill:?}): joined as voter in {elapsed:?} \
         ({:.0} MiB/s), {during} writes committed meanwhile, {snapshots}",
        mib as f64 / elapsed.as_secs_f64()
    );
}
