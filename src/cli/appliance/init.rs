//! `blocktree appliance init`: PID 1 of the appliance image.
//!
//! The image's `/init` (a two-line shell script) mounts devtmpfs so the console
//! exists, then execs this. It mounts the kernel file systems, loads the kernel
//! modules the build listed, reads the configuration from the EFI system
//! partition, configures the network, mounts (and on first boot formats) the data
//! disk, creates missing volumes, then runs `blocktree up` and the other services
//! as supervised children: restarted with backoff when they exit, their output
//! copied to every console. It reaps every orphan, prints a banner once the NBD
//! export is ready, and on ctrl-alt-del, SIGTERM (reboot), SIGUSR2 or the ACPI
//! power button (power off) stops the services, so `up` makes every write durable,
//! then syncs, unmounts and restarts or powers off the machine.
//!
//! PID 1 must never exit: every failure is shown on the console and the init then
//! waits for a reboot request instead.

use anyhow::{Context, Result, bail};
use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};
use rustix::process::{Pid, Signal, WaitOptions};
use rustix::system::RebootCommand;
use signal_hook::consts::signal::{SIGCHLD, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::config::ApplianceConfig;
use super::disk::{self, DiskContents};

/// Where the EFI system partition is mounted (read-only).
const ESP_MOUNT: &str = "/boot";
/// The configuration file, relative to the root of the EFI system partition.
pub const CONFIG_ON_ESP: &str = "blocktree/appliance.toml";
/// Where the data disk is mounted.
const DATA_MOUNT: &str = "/data";
/// The data directory of `blocktree up` on the data disk.
const DATA_DIR: &str = "/data/blocktree";
/// The kernel modules to load, one path a line, in dependency order (written by
/// `appliance-image/build`).
const MODULE_LIST: &str = "/etc/blocktree/modules";
/// The script udhcpc runs to apply a lease (written by `appliance-image/build`).
const UDHCPC_SCRIPT: &str = "/etc/blocktree/udhcpc.script";
const BUSYBOX: &str = "/bin/busybox";
const MKE2FS: &str = "/sbin/mke2fs";
const DROPBEAR: &str = "/usr/sbin/dropbear";
const DROPBEARKEY: &str = "/usr/bin/dropbearkey";
/// The SSH host key, on the data disk so it survives reboots.
const SSH_HOST_KEY: &str = "/data/ssh/dropbear_ed25519_host_key";
/// How long to wait for devices the kernel is still probing.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// How long `up` may take to make every write durable on shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(90);
/// A service that ran this long before exiting restarts without delay.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The consoles of the kernel command line (`console=ttyS0,115200 console=tty0`),
/// each written every line, so the serial log and the screen show the same.
#[derive(Clone)]
struct Console {
    outputs: Arc<Mutex<Vec<File>>>,
}

impl Console {
    fn open(cmdline: &str) -> Console {
        let mut names: Vec<String> = cmdline
            .split_whitespace()
            .filter_map(|parameter| parameter.strip_prefix("console="))
            .map(|value| value.split(',').next().unwrap_or(value).to_owned())
            .collect();
        if names.is_empty() {
            names.push("console".to_owned());
        }
        names.dedup();
        let outputs = names
            .iter()
            .filter_map(|name| {
                // No controlling terminal: a ^C typed on the console must not
                // signal PID 1.
                OpenOptions::new()
                    .write(true)
                    .custom_flags(OFlags::NOCTTY.bits() as i32)
                    .open(Path::new("/dev").join(name))
                    .ok()
            })
            .collect();
        Console {
            outputs: Arc::new(Mutex::new(outputs)),
        }
    }

    /// Writes `text` and a newline to every console; a console that fails is
    /// skipped (there is nowhere to report it).
    fn line(&self, text: &str) {
        let Ok(mut outputs) = self.outputs.lock() else {
            return;
        };
        for output in outputs.iter_mut() {
            let _ = writeln!(output, "{text}");
        }
    }

    /// A message of the init, stamped with the seconds since the kernel started
    /// (to see where boot time goes).
    fn say(&self, text: &str) {
        self.line(&format!("blocktree-init [{}]: {text}", uptime()));
    }

    fn warn(&self, text: &str) {
        self.say(&format!("warning: {text}"));
    }
}

/// The kernel's uptime in seconds (`12.34`), or `?`.
fn uptime() -> String {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// What the main loop reacts to.
enum Event {
    Signal(i32),
    PowerButton,
    /// `blocktree up` printed its `ready:` line; its report lines before it.
    Ready(Vec<String>),
}

/// How the machine goes down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shutdown {
    Reboot,
    PowerOff,
}

/// Runs PID 1; returns only when it was not started as PID 1.
pub fn run() -> Result<()> {
    if rustix::process::getpid() != Pid::INIT {
        bail!(
            "`blocktree appliance init` is PID 1 of the appliance image (its /init), not a command to run"
        );
    }
    mount_kernel_file_systems();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let console = Console::open(&cmdline);
    console.say(&format!(
        "Blocktree appliance {}",
        env!("CARGO_PKG_VERSION")
    ));
    // ctrl-alt-del becomes SIGINT to PID 1 instead of an immediate reset.
    if let Err(error) = rustix::system::reboot(RebootCommand::CadOff) {
        console.warn(&format!("cannot take over ctrl-alt-del: {error}"));
    }
    let (sender, events) = mpsc::channel();
    if let Err(error) = forward_signals(sender.clone()) {
        console.warn(&format!("cannot handle signals: {error:#}"));
    }
    let _ = rustix::system::sethostname(b"blocktree");
    load_modules(&console);
    watch_power_button(&console, &sender);

    let mut services = Vec::new();
    let how = match start(&console, &cmdline, &sender, &mut services) {
        Ok(()) => supervise(&console, &events, &mut services),
        Err(error) => {
            console.line("");
            console.say(&format!("error: {error:#}"));
            console.say(
                "the storage service is not started. Fix the configuration (blocktree/appliance.toml \
                 on the EFI partition, or blocktree.KEY=VALUE on the kernel command line in \
                 loader/entries/blocktree.conf) and reboot with ctrl-alt-del.",
            );
            supervise(&console, &events, &mut services)
        }
    };
    stop_services(&console, &mut services);
    unmount_all(&console);
    match how {
        Shutdown::Reboot => {
            console.say("rebooting");
            let _ = rustix::system::reboot(RebootCommand::Restart);
        }
        Shutdown::PowerOff => {
            console.say("powering off");
            let _ = rustix::system::reboot(RebootCommand::PowerOff);
        }
    }
    // PID 1 must not exit, even if the reboot call failed.
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

fn mount_kernel_file_systems() {
    let nodev = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let mounts: [(&str, &str, MountFlags, &str); 6] = [
        ("proc", "/proc", nodev, ""),
        ("sysfs", "/sys", nodev, ""),
        ("devtmpfs", "/dev", MountFlags::NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            "gid=5,mode=620",
        ),
        (
            "tmpfs",
            "/run",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=1777",
        ),
    ];
    for (kind, target, flags, options) in mounts {
        let _ = fs::create_dir_all(target);
        let options = std::ffi::CString::new(options).unwrap_or_default();
        // EBUSY: /init mounted it already.
        let _ = rustix::mount::mount(kind, target, kind, flags, options.as_c_str());
    }
}

/// Forwards the signals PID 1 acts on to the main loop.
fn forward_signals(sender: Sender<Event>) -> Result<()> {
    let mut signals = Signals::new([SIGCHLD, SIGINT, SIGTERM, SIGUSR1, SIGUSR2])
        .context("cannot install the signal handlers")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if sender.send(Event::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn load_modules(console: &Console) {
    let Ok(list) = fs::read_to_string(MODULE_LIST) else {
        console.warn(&format!(
            "no module list {MODULE_LIST}: loading no kernel modules"
        ));
        return;
    };
    for path in list.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let loaded = File::open(path)
            .map_err(|error| error.to_string())
            .and_then(|file| match rustix::system::finit_module(&file, c"", 0) {
                Ok(()) | Err(Errno::EXIST) => Ok(()),
                Err(error) => Err(error.to_string()),
            });
        if let Err(error) = loaded {
            // Some modules only apply to some hardware (crc32c-intel needs SSE4.2).
            console.warn(&format!("cannot load module {path}: {error}"));
        }
    }
}

/// Turns a press of the ACPI power button (QEMU's `system_powerdown`) into a
/// clean power-off: the kernel reports it as KEY_POWER on an input device.
fn watch_power_button(console: &Console, sender: &Sender<Event>) {
    let Ok(entries) = fs::read_dir("/sys/class/input") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let device = fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
        if device.trim() != "Power Button" {
            continue;
        }
        let Ok(mut input) = File::open(Path::new("/dev/input").join(&name)) else {
            console.warn(&format!("cannot open the power button /dev/input/{name}"));
            continue;
        };
        let sender = sender.clone();
        let _ = thread::Builder::new()
            .name("power-button".into())
            .spawn(move || {
                // struct input_event on 64-bit Linux: a 16-byte timestamp, then
                // u16 type, u16 code, i32 value.
                const EV_KEY: u16 = 1;
                const KEY_POWER: u16 = 116;
                let mut record = [0u8; 24];
                while input.read_exact(&mut record).is_ok() {
                    let kind = u16::from_ne_bytes([record[16], record[17]]);
                    let code = u16::from_ne_bytes([record[18], record[19]]);
                    let value =
                        i32::from_ne_bytes([record[20], record[21], record[22], record[23]]);
                    if kind == EV_KEY
                        && code == KEY_POWER
                        && value == 1
                        && sender.send(Event::PowerButton).is_err()
                    {
                        return;
                    }
                }
            });
    }
}

/// Everything between the kernel and the running services.
fn start(
    console: &Console,
    cmdline: &str,
    events: &Sender<Event>,
    services: &mut Vec<Service>,
) -> Result<()> {
    let config = load_config(console, cmdline)?;
    if config.console.login {
        enable_console_login(console, &config, cmdline, services)?;
    }
    configure_network(console, &config, services)?;
    let disk = mount_data_disk(console, &config)?;
    console.say(&format!(
        "data disk {} mounted on {DATA_MOUNT}",
        disk.display()
    ));
    if config.ssh.enabled {
        enable_ssh(console, &config, services)?;
    }
    let blocktree = std::env::current_exe().context("cannot find the blocktree binary")?;
    let password_file = (!config.credentials.root_password_file.is_empty())
        .then(|| Path::new(ESP_MOUNT).join(&config.credentials.root_password_file));
    create_missing_volumes(console, &config, &blocktree, password_file.as_deref())?;

    let mut args: Vec<OsString> = vec![
        "up".into(),
        "--data".into(),
        DATA_DIR.into(),
        "--nbd".into(),
        config.network.nbd.clone().into(),
        "--log".into(),
        config.service.log.clone().into(),
    ];
    if let Some(file) = &password_file {
        args.push("--root-password-file".into());
        args.push(file.into());
    }
    if !config.cluster.listen.is_empty() {
        args.push("--listen".into());
        args.push(config.cluster.listen.clone().into());
    }
    let mut up = Service::new("blocktree up", blocktree, args);
    up.ready_events = Some(events.clone());
    up.context = Some(BannerContext {
        nbd: config.network.nbd.clone(),
        login: config.console.login,
        ssh_port: config.ssh.enabled.then_some(config.ssh.port),
    });
    services.push(up);
    Ok(())
}

fn load_config(console: &Console, cmdline: &str) -> Result<ApplianceConfig> {
    let path = match mount_esp(console) {
        Some(path) => path,
        None => {
            console.warn(&format!(
                "found no EFI partition holding {CONFIG_ON_ESP}: using the defaults"
            ));
            PathBuf::new()
        }
    };
    let mut config = if path.as_os_str().is_empty() {
        ApplianceConfig::default()
    } else {
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        ApplianceConfig::parse(&text, &path.display().to_string())?
    };
    config.apply_cmdline(cmdline)?;
    for warning in config.validate()? {
        console.warn(&warning);
    }
    Ok(config)
}

/// Mounts, read-only on [`ESP_MOUNT`], the first partition that holds
/// [`CONFIG_ON_ESP`], and returns the configuration's path.
fn mount_esp(console: &Console) -> Option<PathBuf> {
    let _ = fs::create_dir_all(ESP_MOUNT);
    let deadline = Instant::now() + DEVICE_WAIT;
    let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    loop {
        let mut partitions: Vec<String> = fs::read_dir("/sys/class/block")
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|entry| entry.path().join("partition").exists())
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        partitions.sort();
        for name in partitions {
            let device = Path::new("/dev").join(&name);
            if rustix::mount::mount(&device, ESP_MOUNT, "vfat", flags, None).is_err() {
                continue;
            }
            let config = Path::new(ESP_MOUNT).join(CONFIG_ON_ESP);
            if config.exists() {
                console.say(&format!(
                    "configuration {CONFIG_ON_ESP} on {}",
                    device.display()
                ));
                return Some(config);
            }
            let _ = rustix::mount::unmount(ESP_MOUNT, UnmountFlags::empty());
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Gives root the configured password hash and runs a getty on each console.
fn enable_console_login(
    console: &Console,
    config: &ApplianceConfig,
    cmdline: &str,
    services: &mut Vec<Service>,
) -> Result<()> {
    fs::write(
        "/etc/shadow",
        format!("root:{}:19000:0:99999:7:::\n", config.console.password_hash),
    )
    .context("cannot write /etc/shadow")?;
    let mut ttys: Vec<String> = cmdline
        .split_whitespace()
        .filter_map(|parameter| parameter.strip_prefix("console="))
        .map(|value| value.split(',').next().unwrap_or(value).to_owned())
        .map(|name| {
            if name == "tty0" {
                "tty1".to_owned()
            } else {
                name
            }
        })
        .collect();
    ttys.dedup();
    for tty in ttys {
        console.say(&format!("console login on {tty}"));
        let args = vec![
            "getty".into(),
            "-L".into(),
            "115200".into(),
            tty.into(),
            "linux".into(),
        ];
        services.push(Service::new("getty", BUSYBOX.into(), args));
    }
    Ok(())
}

/// Installs the authorized keys, creates the host key on first use, and runs
/// dropbear with password logins disabled.
fn enable_ssh(
    console: &Console,
    config: &ApplianceConfig,
    services: &mut Vec<Service>,
) -> Result<()> {
    let ssh_dir = Path::new("/root/.ssh");
    fs::create_dir_all(ssh_dir).context("cannot create /root/.ssh")?;
    fs::set_permissions(ssh_dir, fs::Permissions::from_mode(0o700))
        .context("cannot protect /root/.ssh")?;
    let keys = ssh_dir.join("authorized_keys");
    let mut lines = config.ssh.authorized_keys.join("\n");
    lines.push('\n');
    fs::write(&keys, lines).context("cannot write /root/.ssh/authorized_keys")?;
    fs::set_permissions(&keys, fs::Permissions::from_mode(0o600))
        .context("cannot protect /root/.ssh/authorized_keys")?;
    if !config.console.login {
        // `!` (locked) makes dropbear refuse even key logins; `*` matches no
        // password, so logins stay key-only.
        fs::write("/etc/shadow", "root:*:19000:0:99999:7:::\n")
            .context("cannot write /etc/shadow")?;
    }
    let host_key = Path::new(SSH_HOST_KEY);
    if !host_key.exists() {
        if let Some(dir) = host_key.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        console.say("creating the SSH host key");
        run_helper(console, DROPBEARKEY, &["-t", "ed25519", "-f", SSH_HOST_KEY])?;
    }
    let port = config.ssh.port.to_string();
    let args = [
        "-F",
        "-E",
        "-s",
        "-p",
        &port,
        "-r",
        SSH_HOST_KEY,
        "-P",
        "/run/dropbear.pid",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    console.say(&format!("SSH on port {port} (keys only)"));
    services.push(Service::new("dropbear", DROPBEAR.into(), args));
    Ok(())
}

fn configure_network(
    console: &Console,
    config: &ApplianceConfig,
    services: &mut Vec<Service>,
) -> Result<()> {
    run_helper(console, BUSYBOX, &["ip", "link", "set", "lo", "up"])?;
    let interface = if config.network.interface == "auto" {
        match first_interface() {
            Some(name) => name,
            None => {
                console.warn("no network interface: the NBD server is reachable from nowhere");
                return Ok(());
            }
        }
    } else {
        config.network.interface.clone()
    };
    match config.static_address()? {
        None => {
            console.say(&format!("network: DHCP on {interface}"));
            let args = vec![
                "udhcpc".into(),
                "-f".into(),
                "-i".into(),
                interface.into(),
                "-s".into(),
                UDHCPC_SCRIPT.into(),
            ];
            services.push(Service::new("udhcpc", BUSYBOX.into(), args));
        }
        Some((address, prefix)) => {
            let cidr = format!("{address}/{prefix}");
            run_helper(
                console,
                BUSYBOX,
                &["ip", "addr", "add", &cidr, "dev", &interface],
            )?;
            run_helper(console, BUSYBOX, &["ip", "link", "set", &interface, "up"])?;
            if !config.network.gateway.is_empty() {
                run_helper(
                    console,
                    BUSYBOX,
                    &[
                        "ip",
                        "route",
                        "add",
                        "default",
                        "via",
                        &config.network.gateway,
                    ],
                )?;
            }
            console.say(&format!("network: {interface} {cidr}"));
        }
    }
    Ok(())
}

/// The first network interface other than loopback, waiting for the driver.
fn first_interface() -> Option<String> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        let mut names: Vec<String> = fs::read_dir("/sys/class/net")
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| name != "lo")
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        if let Some(name) = names.into_iter().next() {
            return Some(name);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Finds the data disk, formats it when it is blank, and mounts it.
fn mount_data_disk(console: &Console, config: &ApplianceConfig) -> Result<PathBuf> {
    let deadline = Instant::now() + DEVICE_WAIT;
    let device = loop {
        let found = if config.storage.data_disk == "auto" {
            let devices = disk::scan(Path::new("/sys/block"))?;
            disk::choose_data_disk(&devices).map(|device| Path::new("/dev").join(&device.name))
        } else {
            let path = PathBuf::from(&config.storage.data_disk);
            path.exists().then_some(path)
        };
        if let Some(device) = found {
            break device;
        }
        if Instant::now() >= deadline {
            if config.storage.data_disk == "auto" {
                bail!(
                    "no data disk: attach a virtio disk without partitions, or name one with \
                     storage.data_disk (kernel command line: blocktree.data_disk=/dev/NAME)"
                );
            }
            bail!("the data disk {} does not exist", config.storage.data_disk);
        }
        thread::sleep(Duration::from_millis(250));
    };
    match disk::probe(&device)? {
        DiskContents::Ext => {}
        DiskContents::Blank => {
            console.say(&format!(
                "{} is blank: formatting it (ext4) on this first boot",
                device.display()
            ));
            let device_text = device.to_string_lossy();
            run_helper(
                console,
                MKE2FS,
                &["-q", "-t", "ext4", "-L", "blocktree-data", &device_text],
            )?;
        }
        DiskContents::Other(what) => bail!(
            "the data disk {} holds {what}: the appliance formats only blank disks (first and \
             last MiB zero) and mounts ext4 ones. Name another disk with storage.data_disk \
             (blocktree.data_disk=/dev/NAME), or wipe this one if its data is not needed",
            device.display()
        ),
    }
    fs::create_dir_all(DATA_MOUNT).with_context(|| format!("cannot create {DATA_MOUNT}"))?;
    rustix::mount::mount(
        &device,
        DATA_MOUNT,
        "ext4",
        MountFlags::NOATIME | MountFlags::NOSUID | MountFlags::NODEV,
        None,
    )
    .with_context(|| format!("cannot mount {} (ext4) on {DATA_MOUNT}", device.display()))?;
    Ok(device)
}

/// Creates the configured volumes that do not exist yet; on first boot the first
/// one also creates the domain (and shows the generated root password once).
fn create_missing_volumes(
    console: &Console,
    config: &ApplianceConfig,
    blocktree: &Path,
    password_file: Option<&Path>,
) -> Result<()> {
    let first_boot = !Path::new(DATA_DIR).join("credentials").exists();
    let existing = if first_boot {
        Vec::new()
    } else {
        let listing = run_helper_quiet(blocktree, &["volume", "list", "--data", DATA_DIR])?;
        volume_names(&listing)
    };
    for volume in &config.volumes {
        if existing.contains(&volume.name) {
            continue;
        }
        let mut args = vec![
            "volume",
            "create",
            volume.name.as_str(),
            "--size",
            volume.size.as_str(),
            "--data",
            DATA_DIR,
        ];
        let password_text = password_file.map(|file| file.to_string_lossy().into_owned());
        if let Some(file) = &password_text {
            args.extend(["--root-password-file", file.as_str()]);
        }
        console.say(&format!(
            "creating volume {} ({})",
            volume.name, volume.size
        ));
        run_helper(console, &blocktree.to_string_lossy(), &args)?;
    }
    Ok(())
}

/// The names in the output of `blocktree volume list`: a header line starting with
/// NAME, then one volume a line, its name first.
fn volume_names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .skip_while(|line| !line.starts_with("NAME"))
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Runs a short command, copying its output to the console, and fails with its
/// exit status. Runs on the main thread only, so its wait is never raced by the
/// reaper in [`supervise`].
fn run_helper(console: &Console, program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    for line in String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
    {
        console.line(line);
    }
    if !output.status.success() {
        bail!("{program} {} failed ({})", args.join(" "), output.status);
    }
    Ok(())
}

/// Runs a short command and returns its standard output.
fn run_helper_quiet(program: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What the banner needs besides `up`'s report.
#[derive(Clone)]
struct BannerContext {
    nbd: String,
    login: bool,
    ssh_port: Option<u16>,
}

/// A supervised child process.
struct Service {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    /// Set for `up`: its `ready:` line becomes [`Event::Ready`].
    ready_events: Option<Sender<Event>>,
    context: Option<BannerContext>,
    pid: Option<Pid>,
    started: Instant,
    failures: u32,
    next_start: Instant,
}

impl Service {
    fn new(name: &'static str, program: PathBuf, args: Vec<OsString>) -> Service {
        Service {
            name,
            program,
            args,
            ready_events: None,
            context: None,
            pid: None,
            started: Instant::now(),
            failures: 0,
            next_start: Instant::now(),
        }
    }

    fn spawn(&mut self, console: &Console) {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root");
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                console.warn(&format!("cannot start {}: {error}", self.name));
                self.schedule_restart(console);
                return;
            }
        };
        self.started = Instant::now();
        self.pid = Pid::from_raw(child.id() as i32);
        let prefix = if self.ready_events.is_some() {
            String::new()
        } else {
            format!("{}: ", self.name)
        };
        if let Some(stdout) = child.stdout.take() {
            forward_output(
                stdout,
                console.clone(),
                prefix.clone(),
                self.ready_events.clone(),
            );
        }
        if let Some(stderr) = child.stderr.take() {
            forward_output(stderr, console.clone(), prefix, None);
        }
        // The child is reaped by `reap`, through waitpid(-1), not through `child`.
        drop(child);
    }

    fn schedule_restart(&mut self, console: &Console) {
        if self.started.elapsed() >= HEALTHY_RUN {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        let delay =
            Duration::from_secs(1 << self.failures.min(6).saturating_sub(1)).min(MAX_BACKOFF);
        self.next_start = Instant::now() + delay;
        console.say(&format!(
            "restarting {} in {} s",
            self.name,
            delay.as_secs()
        ));
    }
}

/// Copies `stream` to the console line by line; with `ready`, sends the lines up
/// to the first `ready:` line as [`Event::Ready`].
fn forward_output(
    stream: impl Read + Send + 'static,
    console: Console,
    prefix: String,
    ready: Option<Sender<Event>>,
) {
    let _ = thread::Builder::new().name("output".into()).spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut report = Vec::new();
        let mut ready = ready;
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            match reader.read_until(b'\n', &mut bytes) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&bytes);
            let line = line.trim_end();
            console.line(&format!("{prefix}{line}"));
            if let Some(sender) = &ready {
                report.push(line.to_owned());
                if line.starts_with("ready:") {
                    let _ = sender.send(Event::Ready(std::mem::take(&mut report)));
                    ready = None;
                }
            }
        }
    });
}

/// Runs the services until a shutdown is asked for.
fn supervise(console: &Console, events: &Receiver<Event>, services: &mut [Service]) -> Shutdown {
    loop {
        let now = Instant::now();
        for service in services.iter_mut() {
            if service.pid.is_none() && service.next_start <= now {
                service.spawn(console);
            }
        }
        match events.recv_timeout(Duration::from_millis(500)) {
            Ok(Event::Signal(SIGINT | SIGTERM)) => return Shutdown::Reboot,
            Ok(Event::Signal(SIGUSR1 | SIGUSR2)) | Ok(Event::PowerButton) => {
                return Shutdown::PowerOff;
            }
            Ok(Event::Ready(report)) => {
                console.say("the NBD export is ready");
                let context = services.iter().find_map(|service| service.context.clone());
                if let Some(context) = context {
                    print_banner(console, &report, &context);
                }
            }
            Ok(Event::Signal(_)) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(500)),
        }
        reap(console, services, false);
    }
}

/// Reaps every exited child (wait4(-1), not waitpid(0): orphans may be in other
/// process groups): a service is scheduled for restart (unless
/// `stopping`), an orphan is only collected.
fn reap(console: &Console, services: &mut [Service], stopping: bool) {
    loop {
        let (pid, status) = match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some(exited)) => exited,
            Ok(None) | Err(_) => return,
        };
        let Some(service) = services.iter_mut().find(|service| service.pid == Some(pid)) else {
            continue;
        };
        service.pid = None;
        let how = match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => "stopped".to_owned(),
        };
        if stopping {
            console.say(&format!("{} {how}", service.name));
        } else {
            console.warn(&format!("{} {how}", service.name));
            service.schedule_restart(console);
        }
    }
}

/// SIGTERM to every service, then waits for them (so `up` makes its writes
/// durable); SIGKILL to what is left after [`STOP_TIMEOUT`].
fn stop_services(console: &Console, services: &mut [Service]) {
    for service in services.iter() {
        if let Some(pid) = service.pid {
            console.say(&format!("stopping {}", service.name));
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while services.iter().any(|service| service.pid.is_some()) {
        if Instant::now() >= deadline {
            for service in services.iter() {
                if let Some(pid) = service.pid {
                    console.warn(&format!("{} did not stop: killing it", service.name));
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                }
            }
            thread::sleep(Duration::from_millis(200));
            reap(console, services, true);
            break;
        }
        thread::sleep(Duration::from_millis(100));
        reap(console, services, true);
    }
}

fn unmount_all(console: &Console) {
    rustix::fs::sync();
    for target in [DATA_MOUNT, ESP_MOUNT] {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => {}
            Err(error) => {
                console.warn(&format!(
                    "cannot unmount {target} ({error}): remounting it read-only"
                ));
                let _ = rustix::mount::mount_remount(target, MountFlags::RDONLY, c"");
            }
        }
    }
    rustix::fs::sync();
}

/// The banner: who this node is, where it is and how to attach a volume.
fn print_banner(console: &Console, report: &[String], context: &BannerContext) {
    let field = |label: &str| -> String {
        report
            .iter()
            .find_map(|line| line.strip_prefix(label))
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned())
    };
    let addresses = interface_addresses();
    let port = context
        .nbd
        .rsplit_once(':')
        .map(|(_, port)| port.to_owned())
        .unwrap_or_else(|| "10809".to_owned());
    let listen_host = context
        .nbd
        .rsplit_once(':')
        .map(|(host, _)| host)
        .unwrap_or("");
    let host = if listen_host == "0.0.0.0" || listen_host == "[::]" || listen_host.is_empty() {
        addresses
            .first()
            .map(|(_, address)| address.split('/').next().unwrap_or(address).to_owned())
            .unwrap_or_else(|| "ADDRESS".to_owned())
    } else {
        listen_host.to_owned()
    };
    let volume = field("nbd")
        .rsplit_once('/')
        .map(|(_, name)| name.to_owned())
        .unwrap_or_else(|| "vol0".to_owned());
    let uri = format!("nbd://{host}:{port}/{volume}");
    let address_text = if addresses.is_empty() {
        "none yet (DHCP pending)".to_owned()
    } else {
        addresses
            .iter()
            .map(|(interface, address)| format!("{address} ({interface})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rule = "=".repeat(72);
    let lines = [
        rule.clone(),
        " Blocktree appliance is ready".to_owned(),
        format!(" server principal: {}", field("server principal")),
        format!(" root principal:   {}", field("root principal")),
        format!(" addresses:        {address_text}"),
        format!(" NBD listens on:   {}", context.nbd),
        format!(" volumes:          {}", field("volumes")),
        format!(" attach a volume:  nbd-client {host} {port} -N {volume} /dev/nbd0"),
        format!("                   nbdfuse /mnt/{volume} {uri}"),
        format!("                   qemu-img info {uri}"),
        format!(
            " console login:    {}",
            if context.login {
                "on (root, configured password)"
            } else {
                "off (console.login in blocktree/appliance.toml)"
            }
        ),
        match context.ssh_port {
            Some(port) => format!(" ssh:              ssh -p {port} root@{host} (keys only)"),
            None => " ssh:              off (ssh.enabled in blocktree/appliance.toml)".to_owned(),
        },
        " stop:             ACPI power button (power off), ctrl-alt-del (reboot)".to_owned(),
        rule,
    ];
    for line in lines {
        console.line(&line);
    }
}

/// `(interface, address/prefix)` of every global address, from `ip -o addr`.
fn interface_addresses() -> Vec<(String, String)> {
    let output = Command::new(BUSYBOX)
        .args(["ip", "-o", "addr", "show", "scope", "global"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(output) = output else {
        return Vec::new();
    };
    parse_ip_addresses(&String::from_utf8_lossy(&output.stdout))
}

/// Parses `ip -o addr` lines: `2: eth0    inet 10.0.2.15/24 brd ... scope global eth0`.
fn parse_ip_addresses(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let interface = words.nth(1)?.trim_end_matches(':').to_owned();
            let family = words.next()?;
            if interface == "lo" || (family != "inet" && family != "inet6") {
                return None;
            }
            Some((interface, words.next()?.to_owned()))
        })
        .collect()
}

impl std::fmt::Debug for Service {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Service")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_come_from_the_listing() {
        let listing = "NAME             BYTES        SIZE  BLOCK\n\
                       vol0        1073741824       1 GiB   4096\n\
                       backup     10737418240      10 GiB   4096\n";
        assert_eq!(volume_names(listing), ["vol0", "backup"]);
        assert!(volume_names("no volumes (create one with ...)\n").is_empty());
    }

    #[test]
    fn ip_addresses_are_parsed() {
        let text = "2: eth0    inet 10.0.2.15/24 brd 10.0.2.255 scope global eth0\\       valid_lft forever\n\
                    2: eth0    inet6 fec0::5054:ff:fe12:3456/64 scope site dynamic\n\
                    1: lo    inet 127.0.0.1/8 scope host lo\n";
        let addresses = parse_ip_addresses(text);
        assert_eq!(addresses[0], ("eth0".to_owned(), "10.0.2.15/24".to_owned()));
        assert_eq!(addresses.len(), 2);
    }
}
