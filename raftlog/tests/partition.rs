//! A partition: three members in network namespaces of their own on one
//! bridge; the leader's link goes down. The minority cannot commit, the
//! majority elects a leader and goes on, and after healing all converge.
//! Skipped (with a message) where `ip netns` is not available (not root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Domain, Member, Start, inodes, spec};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// Three namespaces on a bridge, 10.77.<k>.1..3; removed on drop.
struct Network {
    bridge: String,
    namespaces: Vec<String>,
    links: Vec<String>,
    subnet: u8,
}

impl Network {
    fn new() -> Option<Network> {
        let tag = std::process::id() % 0xffff;
        let subnet = (tag % 200) as u8 + 20;
        let network = Network {
            bridge: format!("btbr{tag:x}"),
            namespaces: (1..=3).map(|i| format!("btns{tag:x}-{i}")).collect(),
            links: (1..=3).map(|i| format!("btv{tag:x}-{i}")).collect(),
            subnet,
        };
        if !ip(&["link", "add", &network.bridge, "type", "bridge"]) {
            return None;
        }
        ip(&["link", "set", &network.bridge, "up"]);
        for (i, (ns, link)) in network.namespaces.iter().zip(&network.links).enumerate() {
            let address = format!("10.77.{subnet}.{}/24", i + 1);
            let ok = ip(&["netns", "add", ns])
                && ip(&[
                    "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ])
                && ip(&["link", "set", link, "master", &network.bridge, "up"])
                && ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"])
                && ip(&["-n", ns, "link", "set", "eth0", "up"])
                && ip(&["-n", ns, "link", "set", "lo", "up"]);
            if !ok {
                return None;
            }
        }
        Some(network)
    }

    fn addr(&self, member: usize) -> SocketAddr {
        format!("10.77.{}.{}:7400", self.subnet, member + 1)
            .parse()
            .unwrap()
    }

    fn cut(&self, member: usize) {
        assert!(ip(&["link", "set", &self.links[member], "down"]));
    }

    fn heal(&self, member: usize) {
        assert!(ip(&["link", "set", &self.links[member], "up"]));
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            ip(&["netns", "del", ns]);
        }
        for link in &self.links {
            ip(&["link", "del", link]);
        }
        ip(&["link", "del", &self.bridge]);
    }
}

fn digests_converge(members: &mut [Member], timeout: Duration) -> Vec<(String, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let applied: Vec<_> = members.iter_mut().map(|m| m.status().applied).collect();
        if applied.iter().all(|a| *a == applied[0]) {
            let digests: Vec<_> = members.iter_mut().map(|m| m.digest()).collect();
            let again: Vec<_> = members.iter_mut().map(|m| m.status().applied).collect();
            if again == applied && digests.iter().all(|d| *d == digests[0]) {
                return digests;
            }
        }
        assert!(Instant::now() < deadline, "no convergence: {applied:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_partitioned_leader_cannot_commit_and_the_majority_goes_on() {
    let Some(network) = Network::new() else {
        eprintln!("skipped: `ip netns` is not available here (needs root)");
        return;
    };
    let domain = Domain::new();
    let (writer, _) = domain.store(&["cluster"]);
    let mut specs: Vec<_> = (0..3)
        .map(|i| {
            let mut spec = spec(&domain, &format!("p{}", i + 1), &writer);
            spec.addr = network.addr(i);
            spec.netns = Some(network.namespaces[i].clone());
            spec.extra = vec!["--write-timeout-ms".into(), "2000".into()];
            spec
        })
        .collect();
    let mut members = vec![Member::start(&specs[0], Start::Create { generation: 21 })];
    for spec in &mut specs[1..] {
        members.push(Member::start(
            spec,
            Start::Join {
                addr: network.addr(0),
                path: members[0].spec.path.clone(),
            },
        ));
    }
    let leader_id = members[0].status().leader.unwrap();
    let leader = members.iter().position(|m| m.id == leader_id).unwrap();
    let before = inodes(&members[leader].ask("write 3 2 4096"));
    network.cut(leader);
    // The cut-off leader cannot commit.
    let refused = members[leader].ask("write 1 1 4096");
    assert!(
        refused.starts_with("err"),
        "the minority committed: {refused}"
    );
    // The majority elects one of its own and commits.
    let started = Instant::now();
    let majority: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let after = 'commit: loop {
        for &i in &majority {
            let reply = members[i].ask("write 2 2 4096");
            if reply.starts_with("ok") {
                break 'commit inodes(&reply);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the majority did not go on"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    network.heal(leader);
    let digests = digests_converge(&mut members, Duration::from_secs(30));
    assert_eq!(
        digests[0].1,
        (before.len() + after.len()) as u64,
        "{digests:?}"
    );
    for member in members.iter_mut() {
        for inode in before.iter() {
            assert_eq!(member.ask(&format!("check {inode} 2 4096")), "ok");
        }
        for inode in after.iter() {
            assert_eq!(member.ask(&format!("check {inode} 2 4096")), "ok");
        }
    }
    let old = members[leader].status();
    assert_ne!(
        old.leader.as_deref(),
        Some(members[leader].id.as_str()),
        "{old:?}"
    );
}
