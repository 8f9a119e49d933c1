//! The appliance's configuration: `blocktree/appliance.toml` on the EFI system
//! partition, then `blocktree.KEY=VALUE` overrides from the kernel command line.
//!
//! Everything here is pure (text in, configuration or error out) so the rules are
//! unit tested and `blocktree appliance check-config` can apply them on the build
//! host before an image is made.

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};

use super::super::bench::parse_bytes;

/// The prefix of the kernel command line parameters the appliance reads.
pub const CMDLINE_PREFIX: &str = "blocktree.";

/// The whole configuration. Every section and key is optional; a missing one takes
/// the default shown in `appliance-image/appliance.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplianceConfig {
    /// Addresses: the NBD listener and the network interface.
    pub network: NetworkConfig,
    /// Where the sector data lives.
    pub storage: StorageConfig,
    /// How the domain's credentials are created on first boot.
    pub credentials: CredentialsConfig,
    /// The volumes to create at boot when missing.
    pub volumes: Vec<VolumeConfig>,
    /// Cluster membership (not built yet: issue #7).
    pub cluster: ClusterConfig,
    /// Login on the console.
    pub console: ConsoleConfig,
    /// Remote shell access.
    pub ssh: SshConfig,
    /// The sector service, filesystem service and NBD server (`blocktree up`).
    pub service: ServiceConfig,
}

impl Default for ApplianceConfig {
    fn default() -> ApplianceConfig {
        ApplianceConfig {
            network: NetworkConfig::default(),
            storage: StorageConfig::default(),
            credentials: CredentialsConfig::default(),
            volumes: vec![VolumeConfig {
                name: "vol0".to_owned(),
                size: "1GiB".to_owned(),
            }],
            cluster: ClusterConfig::default(),
            console: ConsoleConfig::default(),
            ssh: SshConfig::default(),
            service: ServiceConfig::default(),
        }
    }
}

/// `[network]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// The address and port the NBD server listens on.
    pub nbd: String,
    /// The interface to configure: `auto` (the first one that is not loopback) or a
    /// name such as `eth0`.
    pub interface: String,
    /// `dhcp`, or a static IPv4 address with its prefix length (`192.0.2.10/24`).
    pub address: String,
    /// The default gateway with a static address (empty: none).
    pub gateway: String,
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            nbd: "0.0.0.0:10809".to_owned(),
            interface: "auto".to_owned(),
            address: "dhcp".to_owned(),
            gateway: String::new(),
        }
    }
}

/// `[storage]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `auto` (the largest virtio disk without partitions) or a device path such as
    /// `/dev/vdb`.
    pub data_disk: String,
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            data_disk: "auto".to_owned(),
        }
    }
}

/// `[credentials]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialsConfig {
    /// A file on the EFI system partition (a path relative to its root) whose first
    /// line is the root password of the domain created on first boot. Empty: a
    /// random password is generated and shown once on the console.
    pub root_password_file: String,
}

/// One `[[volumes]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// The volume's name, its NBD export name.
    pub name: String,
    /// Its size when created (e.g. `1GiB`, `512M`); an existing volume keeps its size.
    pub size: String,
}

/// `[cluster]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The bttp (QUIC) address other servers reach this one on.
    pub listen: String,
    /// The address of a server of the cluster to join instead of creating a domain.
    pub join: String,
}

/// `[console]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Offer a root login on the consoles.
    pub login: bool,
    /// The root password as a crypt(3) hash (`mkpasswd -m sha-512`); required with
    /// `login = true`, because the image has no default password.
    pub password_hash: String,
}

/// `[ssh]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshConfig {
    /// Run an SSH server (dropbear).
    pub enabled: bool,
    /// Its TCP port.
    pub port: u16,
    /// The public keys allowed to log in as root (password logins are never allowed).
    pub authorized_keys: Vec<String>,
}

impl Default for SshConfig {
    fn default() -> SshConfig {
        SshConfig {
            enabled: false,
            port: 22,
            authorized_keys: Vec::new(),
        }
    }
}

/// `[service]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The log level of `blocktree up`: error, warn, info, debug or trace.
    pub log: String,
}

impl Default for ServiceConfig {
    fn default() -> ServiceConfig {
        ServiceConfig {
            log: "warn".to_owned(),
        }
    }
}

/// The kernel command line overrides: `blocktree.KEY=VALUE`, the key they set and
/// what the value is.
pub const OVERRIDES: &[(&str, &str, &str)] = &[
    ("nbd", "network.nbd", "ADDR:PORT"),
    ("interface", "network.interface", "auto or a name"),
    ("address", "network.address", "dhcp or ADDR/PREFIX"),
    ("gateway", "network.gateway", "an IPv4 address"),
    ("data_disk", "storage.data_disk", "auto or /dev/NAME"),
    (
        "root_password_file",
        "credentials.root_password_file",
        "a path on the EFI partition",
    ),
    ("volumes", "volumes", "NAME:SIZE,NAME:SIZE,..."),
    ("listen", "cluster.listen", "ADDR:PORT"),
    ("join", "cluster.join", "ADDR:PORT"),
    ("console_login", "console.login", "true or false"),
    ("ssh", "ssh.enabled", "true or false"),
    ("log", "service.log", "error, warn, info, debug or trace"),
];

/// What a configuration asks that this build cannot do but can go on without.
pub type Warnings = Vec<String>;

impl ApplianceConfig {
    /// Parses the TOML text of `appliance.toml` (`source` names it in errors).
    pub fn parse(text: &str, source: &str) -> Result<ApplianceConfig> {
        toml::from_str(text).map_err(|error| anyhow!("{source}: {error}"))
    }

    /// Applies the `blocktree.KEY=VALUE` parameters of a kernel command line; the
    /// other parameters are the kernel's and are skipped.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Result<()> {
        for parameter in cmdline.split_whitespace() {
            let Some(setting) = parameter.strip_prefix(CMDLINE_PREFIX) else {
                continue;
            };
            let (key, value) = setting.split_once('=').ok_or_else(|| {
                anyhow!("kernel command line: {parameter} has no value (expected {CMDLINE_PREFIX}KEY=VALUE)")
            })?;
            self.apply_override(key, value)
                .with_context(|| format!("kernel command line: {parameter}"))?;
        }
        Ok(())
    }

    /// Sets the key that override `key` names (see [`OVERRIDES`]) to `value`.
    pub fn apply_override(&mut self, key: &str, value: &str) -> Result<()> {
        let text = value.to_owned();
        match key {
            "nbd" => self.network.nbd = text,
            "interface" => self.network.interface = text,
            "address" => self.network.address = text,
            "gateway" => self.network.gateway = text,
            "data_disk" => self.storage.data_disk = text,
            "root_password_file" => self.credentials.root_password_file = text,
            "volumes" => self.volumes = parse_volume_list(value)?,
            "listen" => self.cluster.listen = text,
            "join" => self.cluster.join = text,
            "console_login" => self.console.login = parse_bool(value)?,
            "ssh" => self.ssh.enabled = parse_bool(value)?,
            "log" => self.service.log = text,
            _ => {
                let known: Vec<&str> = OVERRIDES.iter().map(|(name, _, _)| *name).collect();
                bail!("unknown key {key:?}; the keys are {}", known.join(", "));
            }
        }
        Ok(())
    }

    /// Checks every value, returning what this build will ignore; an error names
    /// the key and what it expects.
    pub fn validate(&self) -> Result<Warnings> {
        let mut warnings = Warnings::new();
        self.nbd_address()?;
        if self.network.interface.is_empty() {
            bail!("network.interface is empty (expected \"auto\" or a name such as \"eth0\")");
        }
        let address = self.static_address()?;
        if !self.network.gateway.is_empty() {
            let gateway: Ipv4Addr = self.network.gateway.parse().map_err(|_| {
                anyhow!(
                    "network.gateway = {:?} is not an IPv4 address",
                    self.network.gateway
                )
            })?;
            if address.is_none() {
                warnings.push(format!(
                    "network.gateway = {gateway} is ignored with network.address = \"dhcp\""
                ));
            }
        }
        let disk = &self.storage.data_disk;
        if disk != "auto" && !(disk.starts_with("/dev/") && disk.len() > "/dev/".len()) {
            bail!("storage.data_disk = {disk:?} is neither \"auto\" nor a device path /dev/NAME");
        }
        let password_file = &self.credentials.root_password_file;
        if password_file.split('/').any(|part| part == "..") {
            bail!(
                "credentials.root_password_file = {password_file:?} must stay on the EFI partition (no ..)"
            );
        }
        let mut names = Vec::new();
        for volume in &self.volumes {
            check_volume_name(&volume.name)?;
            if names.contains(&&volume.name) {
                bail!("volumes: {} is listed twice", volume.name);
            }
            names.push(&volume.name);
            let bytes = parse_bytes(&volume.size)
                .map_err(|error| anyhow!("volumes: {}: size: {error}", volume.name))?;
            if bytes == 0 {
                bail!("volumes: {}: size is zero", volume.name);
            }
        }
        if !self.cluster.join.is_empty() {
            bail!(
                "cluster.join = {:?}: an appliance cannot join a cluster from its configuration \
                 yet (the joining server needs credentials granted by the cluster's root: see \
                 `blocktree join --help`); leave cluster.join empty, and set cluster.listen on \
                 the server others join",
                self.cluster.join
            );
        }
        if !self.cluster.listen.is_empty() {
            self.cluster
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|error| anyhow!("cluster.listen = {:?}: {error}", self.cluster.listen))?;
        }
        if self.console.login && !self.console.password_hash.starts_with('$') {
            bail!(
                "console.login = true needs console.password_hash, a crypt(3) hash such as the \
                 output of `mkpasswd -m sha-512` (the image has no default password)"
            );
        }
        if !self.console.login && !self.console.password_hash.is_empty() {
            warnings.push("console.password_hash is unused while console.login = false".into());
        }
        if self.ssh.enabled {
            if self.ssh.authorized_keys.is_empty() {
                bail!(
                    "ssh.enabled = true needs ssh.authorized_keys: SSH logins are by key only \
                     (the image has no default password)"
                );
            }
            if self.ssh.port == 0 {
                bail!("ssh.port is 0");
            }
        }
        for key in &self.ssh.authorized_keys {
            check_public_key(key)?;
        }
        const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
        if !LEVELS.contains(&self.service.log.as_str()) {
            bail!(
                "service.log = {:?} is not one of {}",
                self.service.log,
                LEVELS.join(", ")
            );
        }
        Ok(warnings)
    }

    /// The NBD listening address.
    pub fn nbd_address(&self) -> Result<SocketAddr> {
        self.network.nbd.parse().map_err(|_| {
            anyhow!(
                "network.nbd = {:?} is not an address and port such as \"0.0.0.0:10809\"",
                self.network.nbd
            )
        })
    }

    /// The static address and prefix length, or `None` for DHCP.
    pub fn static_address(&self) -> Result<Option<(Ipv4Addr, u8)>> {
        let text = &self.network.address;
        if text == "dhcp" {
            return Ok(None);
        }
        let invalid = || {
            anyhow!(
                "network.address = {text:?} is neither \"dhcp\" nor an address such as \"192.0.2.10/24\""
            )
        };
        let (address, prefix) = text.split_once('/').ok_or_else(invalid)?;
        let address: Ipv4Addr = address.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        if prefix > 32 {
            return Err(invalid());
        }
        Ok(Some((address, prefix)))
    }
}

/// `vol0:1GiB,vol1:10G`.
fn parse_volume_list(text: &str) -> Result<Vec<VolumeConfig>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|entry| {
            let (name, size) = entry
                .split_once(':')
                .ok_or_else(|| anyhow!("{entry:?} is not NAME:SIZE"))?;
            Ok(VolumeConfig {
                name: name.to_owned(),
                size: size.to_owned(),
            })
        })
        .collect()
}

/// An authorized_keys line: a key type (`ssh-ed25519`, `ecdsa-sha2-nistp256`,
/// `sk-…`), the key, an optional comment; one line, no options.
fn check_public_key(key: &str) -> Result<()> {
    let mut words = key.split_whitespace();
    let kind = words.next().unwrap_or("");
    let body = words.next().unwrap_or("");
    let known_kind = ["ssh-", "ecdsa-", "sk-"]
        .iter()
        .any(|prefix| kind.starts_with(prefix));
    if !known_kind || body.is_empty() || key.contains(['\n', '\r']) {
        let shown: String = key.chars().take(40).collect();
        bail!(
            "ssh.authorized_keys: {shown:?} is not a public key line such as \
             \"ssh-ed25519 AAAA... user@host\""
        );
    }
    Ok(())
}

fn parse_bool(text: &str) -> Result<bool> {
    match text {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => bail!("{text:?} is not true or false"),
    }
}

/// The rule of `blocktree volume create`: 1 to 64 of A-Z a-z 0-9 . _ -, checked
/// here too so a bad name fails before boot rather than at it.
fn check_volume_name(name: &str) -> Result<()> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
        && name != "."
        && name != "..";
    if !valid {
        bail!("volumes: {name:?} is not a volume name (1 to 64 of A-Z a-z 0-9 . _ -)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[network]
nbd = "0.0.0.0:10809"
address = "dhcp"

[storage]
data_disk = "auto"

[[volumes]]
name = "vol0"
size = "1GiB"

[[volumes]]
name = "backup"
size = "10G"

[cluster]
listen = ""
join = ""

[console]
login = false

[ssh]
enabled = false
"#;

    #[test]
    fn an_empty_file_is_the_default_configuration() {
        let config = ApplianceConfig::parse("", "test").unwrap();
        assert_eq!(config, ApplianceConfig::default());
        assert!(config.validate().unwrap().is_empty());
        assert_eq!(config.volumes[0].name, "vol0");
        assert_eq!(config.nbd_address().unwrap().port(), 10809);
    }

    #[test]
    fn the_sample_parses_and_validates() {
        let config = ApplianceConfig::parse(SAMPLE, "test").unwrap();
        assert_eq!(config.volumes.len(), 2);
        assert_eq!(config.volumes[1].size, "10G");
        assert!(config.validate().unwrap().is_empty());
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors_that_name_them() {
        let error = ApplianceConfig::parse("[network]\nnbdd = \"x\"\n", "appliance.toml")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("appliance.toml") && error.contains("nbdd"),
            "{error}"
        );
        let error = ApplianceConfig::parse("[console]\nlogin = \"yes\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(error.contains("login"), "{error}");
    }

    #[test]
    fn kernel_command_line_overrides_win_and_other_parameters_are_skipped() {
        let mut config = ApplianceConfig::parse(SAMPLE, "test").unwrap();
        config
            .apply_cmdline(
                "BOOT_IMAGE=/vmlinuz console=ttyS0 quiet blocktree.data_disk=/dev/vdc \
                 blocktree.nbd=127.0.0.1:10810 blocktree.volumes=a:1G,b:2GiB blocktree.log=info",
            )
            .unwrap();
        assert_eq!(config.storage.data_disk, "/dev/vdc");
        assert_eq!(config.network.nbd, "127.0.0.1:10810");
        assert_eq!(config.service.log, "info");
        let names: Vec<&str> = config.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(config.validate().unwrap().is_empty());
    }

    #[test]
    fn bad_overrides_are_errors() {
        let mut config = ApplianceConfig::default();
        let error = config.apply_cmdline("blocktree.nbdport=1").unwrap_err();
        assert!(format!("{error:#}").contains("unknown key"), "{error:#}");
        assert!(
            config
                .apply_cmdline("blocktree.console_login=maybe")
                .is_err()
        );
        assert!(config.apply_cmdline("blocktree.nbd").is_err());
        assert!(config.apply_cmdline("blocktree.volumes=novalue").is_err());
    }

    #[test]
    fn every_documented_override_is_accepted() {
        for (key, _, _) in OVERRIDES {
            let value = match *key {
                "console_login" | "ssh" => "false",
                "volumes" => "vol0:1G",
                _ => "x",
            };
            ApplianceConfig::default()
                .apply_override(key, value)
                .unwrap();
        }
    }

    #[test]
    fn validation_names_the_bad_key() {
        let cases: [(&str, &str); 10] = [
            ("nbd", "nbd"),
            ("address", "10.0.0.1"),
            ("address", "10.0.0.1/33"),
            ("gateway", "router"),
            ("data_disk", "vdb"),
            ("volumes", "bad/name:1G"),
            ("volumes", "vol0:huge"),
            ("volumes", "a:1G,a:2G"),
            ("root_password_file", "../../etc/shadow"),
            ("log", "loud"),
        ];
        for (key, value) in cases {
            let mut config = ApplianceConfig::default();
            config.apply_override(key, value).unwrap();
            assert!(config.validate().is_err(), "{key}={value} was accepted");
        }
    }

    #[test]
    fn static_addresses_parse() {
        let mut config = ApplianceConfig::default();
        config.apply_override("address", "192.0.2.10/24").unwrap();
        config.apply_override("gateway", "192.0.2.1").unwrap();
        assert!(config.validate().unwrap().is_empty());
        assert_eq!(
            config.static_address().unwrap(),
            Some((Ipv4Addr::new(192, 0, 2, 10), 24))
        );
    }

    #[test]
    fn joining_is_refused_and_listening_must_be_an_address() {
        let mut config = ApplianceConfig::default();
        config.apply_override("listen", "0.0.0.0:4433").unwrap();
        assert!(config.validate().unwrap().is_empty());
        config.apply_override("listen", "port 4433").unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("cluster.listen"), "{error}");
        config.apply_override("listen", "0.0.0.0:4433").unwrap();
        config.apply_override("join", "192.0.2.1:4433").unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("blocktree join --help"), "{error}");
    }

    #[test]
    fn console_login_needs_a_password_hash() {
        let mut config = ApplianceConfig::default();
        config.console.login = true;
        assert!(config.validate().is_err());
        config.console.password_hash = "$6$salt$hash".to_owned();
        assert!(config.validate().unwrap().is_empty());
    }

    #[test]
    fn ssh_needs_valid_authorized_keys() {
        let mut config = ApplianceConfig::default();
        config.apply_override("ssh", "true").unwrap();
        assert!(config.validate().is_err());
        config.ssh.authorized_keys = vec!["not a key".to_owned()];
        assert!(config.validate().is_err());
        config.ssh.authorized_keys = vec!["ssh-ed25519 AAAAC3Nza me@host".to_owned()];
        assert!(config.validate().unwrap().is_empty());
        let parsed = ApplianceConfig::parse(
            "[ssh]\nenabled = true\nport = 2222\nauthorized_keys = [\"ecdsa-sha2-nistp256 AAAA\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(parsed.ssh.port, 2222);
        assert!(parsed.validate().unwrap().is_empty());
    }
}
