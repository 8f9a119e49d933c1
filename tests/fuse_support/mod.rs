//! What the `fuse_*` tests share: a volume in a temporary directory, the
//! `blocktree mount` daemon run as a child process, and a guard that always
//! unmounts, so a failing test leaves no mount behind.

#![allow(dead_code)] // each test binary uses a different part

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const BLOCKTREE: &str = env!("CARGO_BIN_EXE_blocktree");
pub const PASSWORD: &str = "correct horse battery staple";

/// How long a mount may take to appear (domain creation costs an Argon2id run).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an unmount may take (the kernel hands back its cached writes first).
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary directory under /tmp holding a data directory, a password file
/// and a mount point, readable by every user (the non-root tests walk into it).
pub struct Volume {
    dir: TempDir,
    mounts: std::cell::Cell<u32>,
}

impl Volume {
    pub fn new() -> Volume {
        let dir = tempfile::Builder::new()
            .prefix("btfuse-test-")
            .tempdir_in("/tmp")
            .expect("temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(dir.path().join("password"), format!("{PASSWORD}\n")).expect("password");
        fs::create_dir(dir.path().join("mnt")).expect("mount point");
        Volume {
            dir,
            mounts: std::cell::Cell::new(0),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn data(&self) -> PathBuf {
        self.path("data")
    }

    pub fn mountpoint(&self) -> PathBuf {
        self.path("mnt")
    }

    /// `blocktree mount MNT --data DATA --root-password-file PASSWORD extra...`,
    /// once the mount is up.
    pub fn mount(&self, extra: &[&str]) -> Mount {
        let mut args: Vec<String> = vec![
            "mount".into(),
            arg(&self.mountpoint()),
            "--data".into(),
            arg(&self.data()),
            "--root-password-file".into(),
            arg(&self.path("password")),
        ];
        args.extend(extra.iter().map(|extra| extra.to_string()));
        self.mount_with(&args)
    }

    /// `blocktree mount MNT --data DATA --credentials STORE extra...`.
    pub fn mount_as(&self, store: &Path, extra: &[&str]) -> Mount {
        let mut args: Vec<String> = vec![
            "mount".into(),
            arg(&self.mountpoint()),
            "--data".into(),
            arg(&self.data()),
            "--credentials".into(),
            arg(store),
        ];
        args.extend(extra.iter().map(|extra| extra.to_string()));
        self.mount_with(&args)
    }

    fn mount_with(&self, args: &[String]) -> Mount {
        let n = self.mounts.get() + 1;
        self.mounts.set(n);
        Mount::start(
            args,
            &self.mountpoint(),
            &self.path(&format!("mount-{n}.out")),
            &self.path(&format!("mount-{n}.err")),
        )
    }

    /// Runs `blocktree args...`; it must succeed. Returns stdout.
    pub fn blocktree(&self, args: &[&str]) -> String {
        let output = Command::new(BLOCKTREE)
            .args(args)
            .env_remove("BLOCKTREE_ROOT_PASSWORD")
            .stdin(Stdio::null())
            .output()
            .expect("run blocktree");
        assert!(
            output.status.success(),
            "blocktree {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// A second principal of this volume's domain: `provision new-runtime`,
    /// `request`, `approve` by the root (in DATA/credentials), `import`, with a
    /// writecap for `/<root>/<rest>` (the whole domain when `rest` is empty).
    pub fn principal(&self, name: &str, root: &str, rest: &str) -> PathBuf {
        let store = self.path(name);
        let request = self.path(&format!("{name}.request"));
        let writecap = self.path(&format!("{name}.writecap"));
        let path = if rest.is_empty() {
            format!("/{root}")
        } else {
            format!("/{root}/{rest}")
        };
        self.blocktree(&["provision", "new-runtime", "--store", &arg(&store)]);
        self.blocktree(&[
            "provision",
            "request",
            "--store",
            &arg(&store),
            "--path",
            &path,
            "--out",
            &arg(&request),
        ]);
        self.blocktree(&[
            "provision",
            "approve",
            "--store",
            &arg(&self.data().join("credentials")),
            "--request",
            &arg(&request),
            "--password-file",
            &arg(&self.path("password")),
            "--out",
            &arg(&writecap),
        ]);
        self.blocktree(&[
            "provision",
            "import",
            "--store",
            &arg(&store),
            "--writecap",
            &arg(&writecap),
        ]);
        store
    }
}

pub fn arg(path: &Path) -> String {
    path.to_str().expect("temporary paths are UTF-8").to_owned()
}

/// A running `blocktree mount`. Dropping it unmounts (SIGTERM, then by force).
pub struct Mount {
    child: Option<Child>,
    mountpoint: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Mount {
    fn start(args: &[String], mountpoint: &Path, stdout: &Path, stderr: &Path) -> Mount {
        let child = Command::new(BLOCKTREE)
            .args(args)
            .env_remove("BLOCKTREE_ROOT_PASSWORD")
            .stdin(Stdio::null())
            .stdout(fs::File::create(stdout).expect("stdout file"))
            .stderr(fs::File::create(stderr).expect("stderr file"))
            .spawn()
            .expect("start blocktree mount");
        let mut mount = Mount {
            child: Some(child),
            mountpoint: mountpoint.canonicalize().expect("mount point"),
            stdout: stdout.to_owned(),
            stderr: stderr.to_owned(),
        };
        let started = Instant::now();
        loop {
            let ready = fs::read_to_string(&mount.stdout)
                .is_ok_and(|out| out.contains("SIGINT or SIGTERM unmounts."));
            if ready && is_mounted(&mount.mountpoint) {
                return mount;
            }
            if let Some(status) = mount.child_mut().try_wait().expect("wait") {
                panic!(
                    "blocktree {args:?} exited ({status}) before mounting: {}",
                    mount.stderr_text()
                );
            }
            assert!(
                started.elapsed() < MOUNT_TIMEOUT,
                "{} did not appear in /proc/self/mountinfo within {MOUNT_TIMEOUT:?}; stderr: {}",
                mount.mountpoint.display(),
                mount.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the daemon is running")
    }

    /// A path inside the mount.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.mountpoint.join(relative)
    }

    /// What the daemon printed on stdout.
    pub fn stdout_text(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// What the daemon printed on stderr.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The value of a `label: value` line of the daemon's report.
    pub fn field(&self, label: &str) -> String {
        let prefix = format!("{label}:");
        let out = self.stdout_text();
        out.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
            .trim()
            .to_owned()
    }

    /// The domain's root principal, from the writecap line (`/<root>, valid until ...`).
    pub fn root_principal(&self) -> String {
        let writecap = self.field("writecap");
        writecap
            .trim_start_matches('/')
            .split([',', '/'])
            .next()
            .expect("a root principal")
            .to_owned()
    }

    /// SIGTERM, as an operator would; the daemon must unmount and exit 0.
    pub fn unmount(self) {
        let (status, stderr) = self.stop();
        assert!(
            status.success(),
            "the daemon exited with {status} after SIGTERM: {stderr}"
        );
    }

    /// SIGTERM; the daemon must unmount and exit. Returns its exit status and
    /// stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("the daemon is running");
        signal(&child, "TERM");
        let status = wait_timeout(&mut child, UNMOUNT_TIMEOUT).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "the daemon did not exit within {UNMOUNT_TIMEOUT:?} of SIGTERM; stderr: {}",
                self.stderr_text()
            )
        });
        assert!(
            !is_mounted(&self.mountpoint),
            "{} is still mounted after the daemon exited",
            self.mountpoint.display()
        );
        (status, self.stderr_text())
    }

    /// SIGKILL: the daemon dies without unmounting or flushing anything; the dead
    /// mount is then detached.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("the daemon is running");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        force_unmount(&self.mountpoint);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            if wait_timeout(&mut child, UNMOUNT_TIMEOUT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        force_unmount(&self.mountpoint);
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

fn force_unmount(mountpoint: &Path) {
    if is_mounted(mountpoint) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z", "-q"])
            .arg(mountpoint)
            .stderr(Stdio::null())
            .status();
    }
    if is_mounted(mountpoint) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mountpoint)
            .stderr(Stdio::null())
            .status();
    }
}

/// True if `mountpoint` (canonical) is a mount point in /proc/self/mountinfo.
pub fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = mountpoint.to_str().unwrap_or_default();
    info.lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted))
}

/// Runs a program (in `dir`); it must succeed. Returns its output.
pub fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} in {} failed ({}):\nstdout: {}\nstderr: {}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a shell command line in `dir`; it must succeed. Returns its stdout.
pub fn shell(script: &str, dir: &Path) -> String {
    let output = run("sh", &["-c", script], dir);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The workspace's own sources: a real tree to copy around.
pub fn source_tree(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// The errno of an I/O result that must have failed.
pub fn errno<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    result
        .expect_err("the operation should have failed")
        .raw_os_error()
        .expect("an errno")
}

// errno values of Linux (the tests do not link libc).
pub const EPERM: i32 = 1;
pub const ENOENT: i32 = 2;
pub const EIO: i32 = 5;
pub const EACCES: i32 = 13;
pub const EEXIST: i32 = 17;
pub const EXDEV: i32 = 18;
pub const ENOTDIR: i32 = 20;
pub const EISDIR: i32 = 21;
pub const EINVAL: i32 = 22;
pub const EROFS: i32 = 30;
pub const ENOTEMPTY: i32 = 39;
pub const ELOOP: i32 = 40;
