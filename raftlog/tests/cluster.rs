//! Process tests of the replicated sector service: `raft-node` members on
//! 127.0.0.1 (see `tests/common`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_engine::{Engine, EngineConfig, WriteBatch};
use common::{Domain, Member, MemberSpec, Start, inodes, spec};
use std::time::{Duration, Instant};

/// Waits until `member` names a leader; returns it.
fn leader_of(member: &mut Member, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let status = member.status();
        if let Some(leader) = status.leader.clone()
            && status.applied.is_some()
        {
            return leader;
        }
        assert!(Instant::now() < deadline, "no leader: {status:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_member_writes_survive_restart_and_sigkill() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let spec = spec(&domain, "solo", &writer);
    let mut member = Member::start(&spec, Start::Create { generation: 7 });
    assert_eq!(leader_of(&mut member, Duration::from_secs(10)), member.id);
    let written = inodes(&member.ask("write 5 3 4096"));
    assert_eq!(written.len(), 5);
    for inode in &written {
        assert_eq!(member.ask(&format!("check {inode} 3 4096")), "ok");
    }
    let before = member.digest();
    assert_eq!(before.1, 5);

    // A clean stop and reopen.
    let spec = member.stop();
    let mut member = Member::start(&spec, Start::Open);
    leader_of(&mut member, Duration::from_secs(10));
    assert_eq!(member.digest(), before);
    let more = inodes(&member.ask("write 2 1 65536"));

    // SIGKILL right after acknowledged writes: they are in the durable log.
    let spec = member.kill();
    let mut member = Member::start(&spec, Start::Open);
    leader_of(&mut member, Duration::from_secs(10));
    for inode in &written {
        assert_eq!(member.ask(&format!("check {inode} 3 4096")), "ok");
    }
    for inode in &more {
        assert_eq!(member.ask(&format!("check {inode} 1 65536")), "ok");
    }
    // Inode numbers are never handed out twice across restarts.
    let again = inodes(&member.ask("write 1 1 4096"));
    assert!(!written.contains(&again[0]) && !more.contains(&again[0]));
    assert_eq!(member.digest().1, 8);
}

/// Starts a three-member cluster: one creates the generation, two join it.
fn three_members(domain: &Domain, writer: &std::path::Path) -> Vec<Member> {
    let first = spec(domain, "n1", writer);
    let mut members = vec![Member::start(&first, Start::Create { generation: 9 })];
    leader_of(&mut members[0], Duration::from_secs(10));
    for name in ["n2", "n3"] {
        let spec = spec(domain, name, writer);
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

/// Waits until every member has applied the same index and returns their
/// content digests.
fn converged_digests(members: &mut [Member], timeout: Duration) -> Vec<(String, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let statuses: Vec<_> = members.iter_mut().map(|member| member.status()).collect();
        let applied: Vec<_> = statuses.iter().map(|status| status.applied).collect();
        let commits: Vec<_> = statuses.iter().map(|status| status.commit).collect();
        if applied
            .iter()
            .all(|index| *index == applied[0] && index.is_some())
            && commits.iter().all(|commit| *commit <= applied[0])
        {
            let digests: Vec<_> = members.iter_mut().map(|member| member.digest()).collect();
            // Applied indexes may move between the status and the digest.
            let after: Vec<_> = members
                .iter_mut()
                .map(|member| member.status().applied)
                .collect();
            if after == applied {
                return digests;
            }
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn index_of(members: &[Member], id: &str) -> usize {
    members
        .iter()
        .position(|member| member.id == id)
        .unwrap_or_else(|| panic!("no member {id}"))
}

/// Writes `files` files of `sectors` sectors through whichever member leads,
/// retrying until one acknowledges (or `timeout`).
fn write_through_leader(
    members: &mut [Member],
    files: u64,
    sectors: u64,
    timeout: Duration,
) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        for at in 0..members.len() {
            let status = members[at].status();
            let Some(leader) = status.leader else {
                continue;
            };
            let Some(target) = members.iter().position(|member| member.id == leader) else {
                continue;
            };
            let reply = members[target].ask(&format!("write {files} {sectors} 4096"));
            if reply.starts_with("ok") {
                return inodes(&reply)
                    .into_iter()
                    .map(|inode| (inode, sectors))
                    .collect();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no write committed within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn three_members_survive_twenty_leader_kills() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let mut members = three_members(&domain, &writer);
    let status = members[0].status();
    assert_eq!(status.voters.len(), 3, "{status:?}");
    let mut acknowledged: Vec<(u64, u64)> = Vec::new();
    let mut failovers = Vec::new();
    for round in 0..20u64 {
        let leader = leader_of(&mut members[0], Duration::from_secs(10));
        let at = index_of(&members, &leader);
        // Acknowledged writes, then one in flight when the leader dies.
        let reply = members[at].ask("write 4 2 4096");
        acknowledged.extend(inodes(&reply).into_iter().map(|inode| (inode, 2)));
        members[at].send("write 2 3 4096");
        std::thread::sleep(Duration::from_millis(2 + (round % 4) * 5));
        let killed = members.remove(at).kill();
        let started = Instant::now();
        acknowledged.extend(write_through_leader(
            &mut members,
            1,
            1,
            Duration::from_secs(10),
        ));
        failovers.push(started.elapsed());
        // The killed member comes back with its data and catches up.
        let restart = Instant::now();
        members.push(Member::start(&killed, Start::Open));
        let started_in = restart.elapsed();
        let digests = converged_digests(&mut members, Duration::from_secs(20));
        eprintln!(
            "round {round}: failover {:?}, restart {:?}, converged {:?}",
            failovers[failovers.len() - 1],
            started_in,
            restart.elapsed()
        );
        assert!(
            digests.iter().all(|digest| *digest == digests[0]),
            "round {round}: members differ: {digests:?}"
        );
        for member in members.iter_mut() {
            for (inode, sectors) in &acknowledged {
                assert_eq!(
                    member.ask(&format!("check {inode} {sectors} 4096")),
                    "ok",
                    "round {round}: inode {inode} on {}",
                    member.id
                );
            }
        }
    }
    failovers.sort();
    eprintln!(
        "failover (SIGKILL to the next committed write): median {:?}, max {:?}",
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1]
    );
}

/// Starts member `s1` of a new cluster with `extra` arguments and waits
/// until it leads.
fn start_leader(domain: &Domain, writer: &std::path::Path, extra: &[&str]) -> (MemberSpec, Member) {
    let mut first = spec(domain, "s1", writer);
    first.extra = extra.iter().map(|arg| arg.to_string()).collect();
    let mut leader = Member::start(&first, Start::Create { generation: 11 });
    leader_of(&mut leader, Duration::from_secs(10));
    (first, leader)
}

/// Asks `member` for `rounds` writes of `files` files of `sectors` sectors of
/// `len` bytes; returns what each wrote, as `check` takes it.
fn write_rounds(
    member: &mut Member,
    rounds: usize,
    files: u64,
    sectors: u64,
    len: u64,
) -> Vec<(u64, u64, u64)> {
    let mut written = Vec::new();
    for _ in 0..rounds {
        let reply = member.ask(&format!("write {files} {sectors} {len}"));
        assert!(reply.starts_with("ok"), "{reply}");
        written.extend(
            inodes(&reply)
                .into_iter()
                .map(|inode| (inode, sectors, len)),
        );
    }
    written
}

/// Starts `joiner` joining `first`'s cluster; the handle ends with it once it
/// is ready. It is spawned on the caller's thread: a member dies with the
/// thread that started it.
fn join_in_background(joiner: &MemberSpec, first: &MemberSpec) -> std::thread::JoinHandle<Member> {
    let mut joining = Member::spawn(
        joiner,
        Start::Join {
            addr: first.addr,
            path: first.path.clone(),
        },
    );
    std::thread::spawn(move || {
        joining.wait_ready();
        joining
    })
}

/// Waits until both members' digests agree and cover `written`, and checks
/// every write on the second.
fn check_converged(members: &mut [Member], written: &[(u64, u64, u64)]) {
    let digests = converged_digests(members, Duration::from_secs(30));
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0].1, written.len() as u64);
    for (inode, sectors, len) in written {
        assert_eq!(
            members[1].ask(&format!("check {inode} {sectors} {len}")),
            "ok"
        );
    }
}

#[test]
fn a_new_member_catches_up_by_snapshot_while_writes_go_on() {
    // The size: 1 GiB (128 rounds of 8 files of 1 MiB).
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let (first, mut leader) = start_leader(&domain, &writer, &["--snapshot-every", "16"]);
    let mut written = write_rounds(&mut leader, 128, 8, 16, 65536);
    let mut joiner = spec(&domain, "s2", &writer);
    joiner.extra = first.extra.clone();
    let join = join_in_background(&joiner, &first);
    let started = Instant::now();
    // Writes go on while the new member receives the snapshot.
    while !join.is_finished() {
        let reply = leader.ask("write 1 4 4096");
        if reply.starts_with("ok") {
            written.extend(inodes(&reply).into_iter().map(|inode| (inode, 4, 4096)));
        }
        // A steady load, not a flood: the two members share one disk.
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the join did not finish"
        );
    }
    let mut joined = join.join().unwrap();
    eprintln!("joined in {:?}", started.elapsed());
    written.extend(write_rounds(&mut leader, 1, 2, 4, 4096));
    assert_eq!(joined.ask("snapshots"), "snapshots 1");
    let mut members = vec![leader, joined];
    check_converged(&mut members, &written);
    let status = members[1].status();
    assert_eq!(status.voters.len(), 2, "{status:?}");
}

/// openraft waits one heartbeat (50 ms) for an append's answer and then sends
/// the entries again. A follower whose appends take longer (here 120 ms each,
/// as behind a far link or a slow disk) must still catch up, join and take
/// part in every commit: with two voters, no write commits without it.
#[test]
fn a_follower_slower_than_a_heartbeat_catches_up_and_commits() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let (first, mut leader) = start_leader(&domain, &writer, &[]);
    let mut written = write_rounds(&mut leader, 12, 8, 4, 4096);
    let mut slow = spec(&domain, "s2", &writer);
    slow.extra = vec!["--append-delay-ms".into(), "120".into()];
    let join = join_in_background(&slow, &first);
    let started = Instant::now();
    while !join.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the slow follower did not join"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let joined = join.join().unwrap();
    eprintln!("joined in {:?}", started.elapsed());
    written.extend(write_rounds(&mut leader, 6, 2, 4, 4096));
    check_converged(&mut [leader, joined], &written);
}

/// The log after a sent snapshot is kept for its receiver, but not past the
/// log's byte budget: a receiver whose appends never succeed in time (here
/// 200 ms each) while writes go on (committed by the two others) costs another
/// snapshot, not a log that grows for as long as the snapshot's pin lasts
/// (60 s).
#[test]
fn a_receiver_that_cannot_keep_up_does_not_hold_the_log_past_its_budget() {
    const BUDGET: u64 = 8 << 20;
    let budget = BUDGET.to_string();
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let (first, mut leader) = start_leader(
        &domain,
        &writer,
        &["--snapshot-every", "16", "--log-bytes", &budget],
    );
    // Two members that keep up: writes commit without the slow third.
    let mut second = spec(&domain, "s2", &writer);
    second.extra = first.extra.clone();
    let _second = join_in_background(&second, &first).join().unwrap();
    write_rounds(&mut leader, 32, 8, 4, 4096);
    let mut slow = spec(&domain, "s3", &writer);
    slow.extra = vec!["--append-delay-ms".into(), "200".into()];
    // It never finishes joining: its appends always come too late. Not
    // waited for, so it lives as long as this thread.
    let _slow = Member::spawn(
        &slow,
        Start::Join {
            addr: first.addr,
            path: first.path.clone(),
        },
    );
    let started = Instant::now();
    let mut most = 0;
    while started.elapsed() < Duration::from_secs(8) {
        write_rounds(&mut leader, 1, 1, 16, 65536);
        let held = leader.ask("log-bytes");
        let held: u64 = held.trim_start_matches("log-bytes ").parse().unwrap();
        most = most.max(held);
    }
    eprintln!("the log held at most {most} bytes (budget {BUDGET})");
    assert!(
        most <= 3 * BUDGET,
        "the log held {most} bytes, past 3× its budget of {BUDGET}"
    );
}

/// The first 32 bytes of sector `index` of `inode` as `raft-node` writes it.
fn sector_pattern(inode: u64, index: u64) -> Vec<u8> {
    blocktree_core::hash::HashAlgorithm::Sha256
        .hash(&[&inode.to_le_bytes(), &index.to_le_bytes()])
        .as_bytes()
        .to_vec()
}

/// Flips a byte of every stored copy of the given sectors in the engine
/// segments under `data`; returns how many copies it hit.
fn flip_sectors(data: &std::path::Path, sectors: &[(u64, u64)]) -> usize {
    let mut hits = 0;
    let engine = data.join("engine");
    for shard in std::fs::read_dir(&engine).unwrap() {
        let shard = shard.unwrap().path();
        if !shard.is_dir() {
            continue;
        }
        for segment in std::fs::read_dir(&shard).unwrap() {
            let segment = segment.unwrap().path();
            if segment.extension().and_then(|e| e.to_str()) != Some("seg") {
                continue;
            }
            let mut bytes = std::fs::read(&segment).unwrap();
            let mut changed = false;
            for (inode, index) in sectors {
                let pattern = sector_pattern(*inode, *index);
                let mut at = 0;
                while let Some(found) = bytes[at..]
                    .windows(pattern.len())
                    .position(|window| window == pattern.as_slice())
                {
                    let offset = at + found + 100;
                    bytes[offset] ^= 0x5a;
                    hits += 1;
                    changed = true;
                    at += found + pattern.len();
                }
            }
            if changed {
                std::fs::write(&segment, &bytes).unwrap();
            }
        }
    }
    hits
}

#[test]
fn a_corrupted_follower_is_repaired_from_the_others() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let mut members = three_members(&domain, &writer);
    let leader = leader_of(&mut members[0], Duration::from_secs(10));
    let at = index_of(&members, &leader);
    let written = inodes(&members[at].ask("write 6 4 4096"));
    converged_digests(&mut members, Duration::from_secs(20));
    let follower = (at + 1) % members.len();
    let spec = members.remove(follower).stop();
    let damaged: Vec<(u64, u64)> = written.iter().take(3).map(|inode| (*inode, 1)).collect();
    assert!(flip_sectors(&spec.data, &damaged) >= damaged.len());
    let mut restarted = Member::start(&spec, Start::Open);
    // A read of a flipped sector detects it (checksum) and repairs it from
    // another member before it answers: the reader sees the right data.
    assert_eq!(restarted.ask(&format!("check {} 4 4096", written[0])), "ok");
    // The scrub finds the others, which nobody read, and repairs them.
    let scrub = restarted.ask("scrub");
    let words: Vec<&str> = scrub.split_whitespace().collect();
    assert_eq!(words[0], "scrub", "{scrub}");
    assert!(words[2].parse::<u64>().unwrap() >= 2, "{scrub}");
    assert_eq!(words[2], words[3], "{scrub}");
    for inode in &written {
        assert_eq!(restarted.ask(&format!("check {inode} 4 4096")), "ok");
    }
    members.push(restarted);
    let digests = converged_digests(&mut members, Duration::from_secs(20));
    assert!(
        digests.iter().all(|digest| *digest == digests[0]),
        "{digests:?}"
    );
    let last = members.len() - 1;
    let again = members[last].ask("scrub");
    assert_eq!(again.split_whitespace().nth(2), Some("0"), "{again}");
}

/// Records rewritten with valid engine checksums but other contents (what
/// checksums cannot see) are found by the scrub's Merkle verification and
/// repaired from the others.
#[test]
fn a_follower_with_rewritten_records_is_found_by_merkle_and_repaired() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let mut members = three_members(&domain, &writer);
    let leader = leader_of(&mut members[0], Duration::from_secs(10));
    let at = index_of(&members, &leader);
    let written = inodes(&members[at].ask("write 6 4 4096"));
    converged_digests(&mut members, Duration::from_secs(20));
    let follower = (at + 1) % members.len();
    let spec = members.remove(follower).stop();
    {
        let engine = Engine::open(EngineConfig::new(spec.data.join("engine"))).unwrap();
        let mut batch = WriteBatch::new();
        for inode in written.iter().take(3) {
            let id = SectorId {
                generation: engine.generation(),
                inode: *inode,
                sector: SectorKind::Data(1),
            };
            let mut record = engine.read(id).wait().unwrap().unwrap();
            record[7] ^= 0x01;
            batch.put(id, record);
        }
        engine.write_durable(batch).wait().unwrap();
        engine.shutdown().unwrap();
    }
    let mut restarted = Member::start(&spec, Start::Open);
    let scrub = restarted.ask("scrub");
    let words: Vec<&str> = scrub.split_whitespace().collect();
    assert_eq!(words[0], "scrub", "{scrub}");
    assert_eq!(words[2], "3", "{scrub}");
    assert_eq!(words[2], words[3], "{scrub}");
    for inode in &written {
        assert_eq!(restarted.ask(&format!("check {inode} 4 4096")), "ok");
    }
    members.push(restarted);
    let digests = converged_digests(&mut members, Duration::from_secs(20));
    assert!(
        digests.iter().all(|digest| *digest == digests[0]),
        "{digests:?}"
    );
}
