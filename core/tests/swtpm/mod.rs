//! A software TPM for tests: swtpm on two loopback ports (commands on `port`,
//! control on `port + 1`, as the swtpm TCTI expects), its state in its own
//! directory, killed when dropped.
//!
//! Shared by the TPM tests of core, netstack and the `blocktree` binary (the
//! others include this file with `#[path]`), so there is one harness to fix.
//! Needs `swtpm` on the PATH (scripts/test installs it).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blocktree_core::aead::random_fill;
use tempfile::TempDir;

/// A running swtpm (or one stopped with its state kept).
pub struct Swtpm {
    state: TempDir,
    /// The command port; the control port is the next one.
    pub port: u16,
    child: Option<Child>,
}

/// Two free consecutive loopback ports, chosen at random among 20000..60000.
fn free_port_pair() -> u16 {
    loop {
        let mut random = [0u8; 2];
        random_fill(&mut random).unwrap();
        let port = 20_000 + u16::from_le_bytes(random) % 40_000;
        let first = TcpListener::bind(("127.0.0.1", port));
        let second = TcpListener::bind(("127.0.0.1", port + 1));
        if first.is_ok() && second.is_ok() {
            return port;
        }
    }
}

impl Swtpm {
    /// A fresh TPM with empty state on free ports.
    pub fn start() -> Swtpm {
        let mut swtpm = Swtpm {
            state: tempfile::tempdir().unwrap(),
            port: 0,
            child: None,
        };
        swtpm.launch(None);
        swtpm
    }

    /// The directory holding the TPM's state (seeds, NV).
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Starts swtpm on `port`, or on fresh ports; retries if another process took
    /// the ports in between.
    pub fn launch(&mut self, port: Option<u16>) {
        for _ in 0..20 {
            let port = port.unwrap_or_else(free_port_pair);
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", self.state.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port}"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={}", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm must be installed (apt-get install swtpm swtpm-tools)");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break; // lost the ports: try others
                }
                if TcpStream::connect(("127.0.0.1", port + 1)).is_ok() {
                    self.port = port;
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    /// The TCTI that reaches this TPM, e.g. `swtpm:host=127.0.0.1,port=2321`.
    pub fn tcti_text(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Kills swtpm, keeping its state.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills swtpm and starts it again on the same ports and state directory:
    /// what a reboot does to a TPM (transient objects and sessions are gone, the
    /// seeds stay).
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.launch(Some(port));
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
