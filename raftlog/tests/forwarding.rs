//! Followers serve the whole sector service by forwarding to the leader
//! (`raft-node` processes on 127.0.0.1, joined knowing only an address).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Domain, Member, MemberSpec, Start, inodes, spec};
use std::time::{Duration, Instant};

/// Waits until every member names the same leader; returns its index.
fn leader_index(members: &mut [Member], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let statuses: Vec<_> = members.iter_mut().map(|member| member.status()).collect();
        if let Some(leader) = statuses[0].leader.clone()
            && statuses
                .iter()
                .all(|status| status.leader.as_ref() == Some(&leader) && status.applied.is_some())
            && let Some(index) = members.iter().position(|member| member.id == leader)
        {
            return index;
        }
        assert!(Instant::now() < deadline, "no common leader: {statuses:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three members reading linearizably; n2 and n3 join by n1's address only.
fn three_members(domain: &Domain, writer: &std::path::Path) -> Vec<Member> {
    let linearizable = |mut spec: MemberSpec| {
        spec.extra.push("--linearizable".into());
        spec
    };
    let first = linearizable(spec(domain, "n1", writer));
    let mut members = vec![Member::start(&first, Start::Create { generation: 11 })];
    leader_index(&mut members, Duration::from_secs(10));
    for name in ["n2", "n3"] {
        let spec = linearizable(spec(domain, name, writer));
        members.push(Member::start(
            &spec,
            Start::JoinAddress { addr: first.addr },
        ));
    }
    members
}

/// Waits until all members applied the same index; returns their digests.
fn digests(members: &mut [Member], timeout: Duration) -> Vec<(String, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let applied: Vec<_> = members.iter_mut().map(|m| m.status().applied).collect();
        if applied.iter().all(|index| *index == applied[0]) {
            let digests: Vec<_> = members.iter_mut().map(|m| m.digest()).collect();
            let after: Vec<_> = members.iter_mut().map(|m| m.status().applied).collect();
            if after == applied {
                return digests;
            }
        }
        assert!(Instant::now() < deadline, "no convergence: {applied:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn followers_write_allocate_and_read_through_the_leader() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let mut members = three_members(&domain, &writer);
    let leader = leader_index(&mut members, Duration::from_secs(10));
    let followers: Vec<usize> = (0..3).filter(|index| *index != leader).collect();
    let (a, b) = (followers[0], followers[1]);

    // Inode allocation and writes on a follower: forwarded, and readable
    // there as soon as the write returns.
    let written = inodes(&members[a].ask("write 6 3 4096"));
    assert_eq!(written.len(), 6);
    for inode in &written {
        assert_eq!(members[a].ask(&format!("check {inode} 3 4096")), "ok");
    }
    // The other follower's linearizable reads see them at once (read index
    // from the leader), and so does the leader.
    for inode in &written {
        assert_eq!(members[b].ask(&format!("check {inode} 3 4096")), "ok");
        assert_eq!(members[leader].ask(&format!("check {inode} 3 4096")), "ok");
    }
    // Both followers allocate: never the same inode twice.
    let more = inodes(&members[b].ask("write 3 1 65536"));
    let on_leader = inodes(&members[leader].ask("write 2 1 4096"));
    let mut all: Vec<u64> = written
        .iter()
        .chain(&more)
        .chain(&on_leader)
        .copied()
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 11, "an inode was handed out twice");

    let digests = digests(&mut members, Duration::from_secs(10));
    assert!(
        digests.iter().all(|digest| *digest == digests[leader]),
        "{digests:?}"
    );
    assert_eq!(digests[leader].1, 11);
}

#[test]
fn a_write_through_a_follower_while_the_leader_dies_is_applied_exactly_once() {
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let mut members = three_members(&domain, &writer);
    // (inode, sectors, sector bytes) of every acknowledged write.
    let mut acknowledged: Vec<(u64, u64, u64)> = Vec::new();
    for round in 0..4 {
        let leader = leader_index(&mut members, Duration::from_secs(15));
        let follower = (leader + 1) % members.len();
        // Allocate a reservation first, so the write in flight is the
        // forwarded batch itself.
        let first = inodes(&members[follower].ask("write 1 1 4096"));
        acknowledged.extend(first.into_iter().map(|inode| (inode, 1, 4096)));
        members[follower].send("write 1 4 65536");
        std::thread::sleep(Duration::from_millis(5 * round));
        let spec = members.remove(leader).kill();
        let follower = if follower > leader {
            follower - 1
        } else {
            follower
        };
        // The follower learns whether the batch committed with the old
        // leader (then it is there) or was lost with it (then it is sent to
        // the new one): either way the answer is success.
        let reply = members[follower].receive();
        assert!(reply.starts_with("ok "), "round {round}: {reply}");
        acknowledged.extend(inodes(&reply).into_iter().map(|inode| (inode, 4, 65536)));
        members.insert(leader, Member::start(&spec, Start::Open));
        // Every acknowledged write is on every member (linearizable reads).
        leader_index(&mut members, Duration::from_secs(15));
        for member in &mut members {
            for (inode, sectors, len) in &acknowledged {
                assert_eq!(
                    member.ask(&format!("check {inode} {sectors} {len}")),
                    "ok",
                    "round {round}: inode {inode} on {}",
                    member.id
                );
            }
        }
    }
    let digests = digests(&mut members, Duration::from_secs(15));
    assert!(
        digests.iter().all(|digest| *digest == digests[0]),
        "{digests:?}"
    );
    eprintln!("{} writes acknowledged", acknowledged.len());
}
