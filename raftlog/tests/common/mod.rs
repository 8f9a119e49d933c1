//! Shared by the process tests: a domain with file credential stores, and
//! `raft-node` members on 127.0.0.1 driven over their standard input.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use blocktree_core::BtPath;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub mod files;

#[path = "../../../netstack/tests/common/domain.rs"]
mod domain;
pub use domain::Domain;

/// The cluster's directory is `/<root>/cluster`; member stores have writecaps
/// for `/<root>/cluster/<name>`, a writer's covers the whole directory.
impl Domain {
    /// The cluster's directory.
    pub fn directory(&self) -> BtPath {
        self.path(&["cluster"])
    }

    /// A store at `components` with a writecap approved by the root.
    pub fn store(&self, components: &[&str]) -> (PathBuf, BtPath) {
        let dir = self
            .dir
            .path()
            .join(format!("creds-{}", components.join("_")));
        let (_, path) = self.approved_store(&dir, components);
        (dir, path)
    }
}

/// A free UDP port on 127.0.0.1 (released for the member to take).
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How a member starts.
#[derive(Clone)]
pub enum Start {
    Create {
        generation: u64,
    },
    Join {
        addr: SocketAddr,
        path: BtPath,
    },
    /// Join knowing only a member's address.
    JoinAddress {
        addr: SocketAddr,
    },
    Open,
}

/// What a member is started with, kept to restart it.
#[derive(Clone)]
pub struct MemberSpec {
    pub data: PathBuf,
    pub store: PathBuf,
    pub writer: PathBuf,
    pub path: BtPath,
    pub directory: BtPath,
    pub addr: SocketAddr,
    /// More arguments for `raft-node`.
    pub extra: Vec<String>,
    /// The network namespace to run it in (`ip netns exec`).
    pub netns: Option<String>,
}

/// A running `raft-node`.
pub struct Member {
    pub spec: MemberSpec,
    pub id: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Member {
    /// Starts a member and waits until it is ready.
    pub fn start(spec: &MemberSpec, start: Start) -> Member {
        let mut member = Member::spawn(spec, start);
        member.wait_ready();
        member
    }

    /// Starts a member without waiting: spawned by the calling thread (the
    /// members die with it), made ready by [`Member::wait_ready`] on any.
    pub fn spawn(spec: &MemberSpec, start: Start) -> Member {
        let program = env!("CARGO_BIN_EXE_raft-node");
        let mut command = match &spec.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, program]);
                command
            }
            None => Command::new(program),
        };
        command
            .arg("--data")
            .arg(&spec.data)
            .arg("--store")
            .arg(&spec.store)
            .arg("--writer")
            .arg(&spec.writer)
            .arg("--listen")
            .arg(spec.addr.to_string())
            .arg("--follower-reads")
            .args(&spec.extra);
        match start {
            Start::Create { generation } => {
                command
                    .arg("--create")
                    .arg(spec.directory.to_string())
                    .arg(generation.to_string());
            }
            Start::Join { addr, path } => {
                command
                    .arg("--join")
                    .arg(addr.to_string())
                    .arg(path.to_string());
            }
            Start::JoinAddress { addr } => {
                command.arg("--join-address").arg(addr.to_string());
            }
            Start::Open => {
                command.arg("--open");
            }
        }
        // SAFETY: the closure runs in the child between fork and exec and only
        // makes one async-signal-safe system call (prctl).
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                // Members die with the test process, even if it aborts.
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Member {
            spec: spec.clone(),
            id: String::new(),
            child,
            stdin,
            stdout,
        }
    }

    /// Waits for the member's `ready` line.
    pub fn wait_ready(&mut self) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"ready"), "the member said {line:?}");
        self.id = words[2].to_string();
    }

    /// Sends a command without waiting for its answer.
    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    /// Reads one answer.
    pub fn receive(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    }

    pub fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.receive()
    }

    /// (role, leader, term, commit, applied)
    pub fn status(&mut self) -> Status {
        let line = self.ask("status");
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        assert_eq!(words[0], "status", "{line}");
        Status {
            role: words[1].clone(),
            leader: (words[2] != "-").then(|| words[2].clone()),
            term: words[3].parse().unwrap(),
            commit: words[4].parse().ok(),
            applied: words[5].parse().ok(),
            voters: words[6]
                .split(',')
                .filter(|w| *w != "-")
                .map(str::to_string)
                .collect(),
            learners: words[7]
                .split(',')
                .filter(|w| *w != "-")
                .map(str::to_string)
                .collect(),
        }
    }

    pub fn digest(&mut self) -> (String, u64) {
        let line = self.ask("digest");
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "digest", "{line}");
        (words[1].to_string(), words[2].parse().unwrap())
    }

    /// SIGKILL, no goodbye.
    pub fn kill(mut self) -> MemberSpec {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.spec.clone()
    }

    /// Closes standard input and waits for a clean exit.
    pub fn stop(mut self) -> MemberSpec {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.spec.clone()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
pub struct Status {
    pub role: String,
    pub leader: Option<String>,
    pub term: u64,
    pub commit: Option<u64>,
    pub applied: Option<u64>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
}

/// A member spec in the domain: its own data directory, store and port.
pub fn spec(domain: &Domain, name: &str, writer: &Path) -> MemberSpec {
    let (store, path) = domain.store(&["cluster", name]);
    MemberSpec {
        data: domain.dir.path().join(format!("data-{name}")),
        store,
        writer: writer.to_path_buf(),
        path,
        directory: domain.directory(),
        addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
        extra: Vec::new(),
        netns: None,
    }
}

/// Parses `ok 3,4,5` into inodes.
pub fn inodes(reply: &str) -> Vec<u64> {
    let rest = reply
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("write failed: {reply}"));
    rest.split(',')
        .map(|inode| inode.parse().unwrap())
        .collect()
}
