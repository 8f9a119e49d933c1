//! What the `nbd_*` tests share: a data directory in a temporary directory, the
//! real `blocktree up` run as a child process on a free port, and the real NBD
//! clients (libnbd's nbdinfo/nbdcopy/nbdfuse, qemu-img/qemu-io, fio) run against
//! it. A guard stops the server (SIGKILL) if a test fails half-way.

#![allow(dead_code)] // each test binary uses a different part

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const BLOCKTREE: &str = env!("CARGO_BIN_EXE_blocktree");
pub const PASSWORD: &str = "correct horse battery staple";

/// How long `up` may take to print its ready line (a first start runs Argon2id).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `up` may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary directory with an appliance's data directory in it.
pub struct Data {
    dir: TempDir,
    starts: std::cell::Cell<u32>,
}

impl Data {
    pub fn new() -> Data {
        let dir = tempfile::Builder::new()
            .prefix("nbd-test-")
            .tempdir_in("/tmp")
            .expect("temporary directory");
        Data {
            dir,
            starts: std::cell::Cell::new(0),
        }
    }

    /// A path in the temporary directory (beside the data directory).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn data(&self) -> PathBuf {
        self.path("data")
    }

    /// `blocktree up --data DATA --nbd 127.0.0.1:0 extra...`, once it is ready.
    pub fn up(&self, extra: &[&str]) -> Up {
        self.serve("up", extra)
    }

    /// `blocktree COMMAND --data DATA --nbd 127.0.0.1:0 extra...` (`up` or
    /// `join`), once it is ready.
    pub fn serve(&self, command: &str, extra: &[&str]) -> Up {
        let n = self.starts.get() + 1;
        self.starts.set(n);
        let mut args: Vec<String> = vec![
            command.into(),
            "--data".into(),
            arg(&self.data()),
            "--nbd".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|extra| extra.to_string()));
        Up::start(
            &args,
            &self.path(&format!("up-{n}.out")),
            &self.path(&format!("up-{n}.err")),
        )
    }

    /// Runs `blocktree args...`; it must succeed. Returns stdout.
    pub fn blocktree(&self, args: &[&str]) -> String {
        let output = self.blocktree_output(args);
        assert!(
            output.status.success(),
            "blocktree {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Runs `blocktree args...` and returns what happened.
    pub fn blocktree_output(&self, args: &[&str]) -> Output {
        Command::new(BLOCKTREE)
            .args(args)
            .env("BLOCKTREE_ROOT_PASSWORD", PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run blocktree")
    }
}

pub fn arg(path: &Path) -> String {
    path.to_str().expect("temporary paths are UTF-8").to_owned()
}

/// A running `blocktree up`. Dropping it kills it.
pub struct Up {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    /// The URI of the default export, from the `nbd:` line.
    pub uri: String,
    /// The TCP port it serves on.
    pub port: u16,
}

impl Up {
    fn start(args: &[String], stdout: &Path, stderr: &Path) -> Up {
        let child = Command::new(BLOCKTREE)
            .args(args)
            .env("BLOCKTREE_ROOT_PASSWORD", PASSWORD)
            .stdin(Stdio::null())
            .stdout(fs::File::create(stdout).expect("stdout file"))
            .stderr(fs::File::create(stderr).expect("stderr file"))
            .spawn()
            .expect("start blocktree up");
        let mut up = Up {
            child: Some(child),
            stdout: stdout.to_owned(),
            stderr: stderr.to_owned(),
            uri: String::new(),
            port: 0,
        };
        let started = Instant::now();
        loop {
            let out = up.stdout_text();
            if out.lines().any(|line| line.starts_with("ready:")) {
                break;
            }
            if let Some(status) = up
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok())
                .flatten()
            {
                panic!(
                    "blocktree {args:?} exited ({status}) before it was ready:\n{out}\n{}",
                    up.stderr_text()
                );
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "blocktree up printed no ready line within {READY_TIMEOUT:?}: {}",
                up.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        up.uri = up.field("nbd");
        let authority = up
            .uri
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("an authority in the URI");
        up.port = authority
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("a port in the URI");
        up
    }

    /// The URI of export `name` (plaintext TCP).
    pub fn uri_of(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stdout_text(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The value of a `label: value` line of the report.
    pub fn field(&self, label: &str) -> String {
        let prefix = format!("{label}:");
        let out = self.stdout_text();
        out.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
            .trim()
            .to_owned()
    }

    /// True while the server process runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGTERM; the server must stop cleanly (exit 0). Returns stdout and stderr.
    pub fn stop(mut self) -> (String, String) {
        let mut child = self.child.take().expect("running");
        signal(&child, "TERM");
        let status = wait_timeout(&mut child, STOP_TIMEOUT).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("blocktree up did not stop within {STOP_TIMEOUT:?} of SIGTERM")
        });
        assert!(
            status.success(),
            "blocktree up exited with {status} after SIGTERM: {}",
            self.stderr_text()
        );
        (self.stdout_text(), self.stderr_text())
    }

    /// Waits for the server to stop by itself; it must exit 0. Returns stdout
    /// and stderr.
    pub fn wait_for_exit(mut self) -> (String, String) {
        let mut child = self.child.take().expect("running");
        let status = wait_timeout(&mut child, STOP_TIMEOUT).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("blocktree did not stop within {STOP_TIMEOUT:?}")
        });
        assert!(
            status.success(),
            "blocktree exited with {status}: {}",
            self.stderr_text()
        );
        (self.stdout_text(), self.stderr_text())
    }

    /// SIGKILL: the server dies without flushing anything.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status();
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if started.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Panics with a useful message when a client program is missing.
pub fn need(program: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    assert!(
        found,
        "{program} is not installed: scripts/test installs the NBD clients \
         (libnbd-bin, qemu-utils, nbdkit, nbdfuse, fio, e2fsprogs)"
    );
}

/// Runs a program; it must succeed. Returns its output.
pub fn run(program: &str, args: &[&str]) -> Output {
    need(program);
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a program; returns its stdout as text. It must succeed.
pub fn run_text(program: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run(program, args).stdout).into_owned()
}

/// Runs a program that must fail; returns its output.
pub fn run_failing(program: &str, args: &[&str]) -> Output {
    need(program);
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        !output.status.success(),
        "{program} {args:?} should have failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `nbdinfo --map URI`: (offset, length, is_hole) runs.
pub fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    run_text("nbdinfo", &["--map", uri])
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let offset = fields.next()?.parse().ok()?;
            let length = fields.next()?.parse().ok()?;
            let flags: u32 = fields.next()?.parse().ok()?;
            Some((offset, length, flags & 1 != 0))
        })
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The first `len` bytes of the export at `uri`, read with nbdcopy.
pub fn read_export(uri: &str, dir: &Path, len: u64) -> Vec<u8> {
    let out = dir.join("export-read.img");
    run("nbdcopy", &[uri, &arg(&out)]);
    let mut bytes = fs::read(&out).expect("read the copy");
    let _ = fs::remove_file(&out);
    bytes.truncate(len as usize);
    bytes
}

/// A connection of the `nbd` crate's client (NBD_OPT_EXPORT_NAME, simple
/// replies, one request at a time): an implementation independent of the server,
/// of libnbd and of qemu.
pub struct Client {
    tcp: std::net::TcpStream,
    export: nbd::client::Export,
}

impl Client {
    pub fn connect(address: &str, name: &str) -> Client {
        let mut tcp = std::net::TcpStream::connect(address).expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let export = nbd::client::handshake(&mut tcp, name.as_bytes()).expect("handshake");
        Client { tcp, export }
    }

    pub fn size(&self) -> u64 {
        self.export.size
    }

    pub fn read_at(&mut self, offset: u64, len: usize) -> Vec<u8> {
        use std::io::{Read, Seek, SeekFrom};
        let mut client = nbd::client::NbdClient::new(&mut self.tcp, &self.export);
        client.seek(SeekFrom::Start(offset)).expect("seek");
        let mut out = vec![0u8; len];
        client.read_exact(&mut out).expect("read");
        out
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) {
        use std::io::{Seek, SeekFrom, Write};
        let mut client = nbd::client::NbdClient::new(&mut self.tcp, &self.export);
        client.seek(SeekFrom::Start(offset)).expect("seek");
        client.write_all(data).expect("write");
    }

    pub fn flush(&mut self) {
        use std::io::Write;
        let mut client = nbd::client::NbdClient::new(&mut self.tcp, &self.export);
        client.flush().expect("flush");
    }
}
