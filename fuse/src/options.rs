//! `-o` mount options: the generic FUSE ones, btfuse's own, and pass-through.

use crate::MountError;
use std::time::Duration;

/// The largest read and write request btfuse asks the kernel for: 1 MiB, 256
/// pages, the kernel's default `fs.fuse.max_pages_limit`.
pub const MAX_IO: u32 = 1 << 20;

/// The mount's readahead unless `-o readahead_kb=N` says otherwise: 4 MiB, so a
/// sequential reader keeps up to four 1 MiB requests in flight for the worker
/// threads to check and decrypt together. A cold 1 GiB read on the benchmark
/// machine: 0.99–1.09 GB/s with 1 MiB, 1.11–1.14 GB/s with 4 MiB.
pub const DEFAULT_READAHEAD_KIB: u32 = 4096;

/// Worker threads serving requests unless `-o threads=N` says otherwise.
pub const DEFAULT_THREADS: usize = 8;

/// How long the kernel may cache names and attributes unless `-o
/// entry_timeout=`/`attr_timeout=` say otherwise. A mount is its store's only
/// writer: `blocktree mount --data` locks the data directory and opens its store
/// without network, so nothing changes a name or an attribute but this mount's
/// own requests, which the kernel sees and updates its cache from (as
/// virtiofs's `cache=always` relies on for a directory it alone uses). The
/// bound is a safety net, not a staleness budget. A mount through a shared
/// store (`--connect`, not built yet) needs a short one.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// How long the kernel may remember that a name does not exist unless `-o
/// negative_timeout=` says otherwise. Short: a directory whose search
/// permission is taken away keeps its missing names this long (ENOENT where
/// a lookup would now say EACCES).
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// The most worker threads `-o threads=N` accepts.
pub const MAX_THREADS: usize = 256;

/// How a Blocktree directory is mounted.
///
/// Built with [`MountOptions::default`] and [`MountOptions::parse`], which takes
/// the comma-separated lists given to `-o`.
#[derive(Clone, Debug, PartialEq)]
pub struct MountOptions {
    /// Mount read-only (`ro`); the kernel refuses writes and btfuse asks for no
    /// writeback cache.
    pub read_only: bool,
    /// Let users other than the one who mounted use the mount (`allow_other`).
    /// Permissions are still checked by the file system's Authorizer.
    pub allow_other: bool,
    /// Let root use the mount too (`allow_root`).
    pub allow_root: bool,
    /// Have fusermount unmount when the daemon dies (`auto_unmount`); needs
    /// `allow_other` or `allow_root`.
    pub auto_unmount: bool,
    /// The kernel's writeback cache (`writeback_cache`, the default unless `ro`;
    /// `no_writeback_cache` turns it off).
    pub writeback_cache: bool,
    /// Threads reading and serving requests concurrently (`threads=N`).
    pub threads: usize,
    /// Readahead of the mount in KiB (`readahead_kb=N`, default 4096; 0 keeps the
    /// kernel's 128). Set through sysfs after mounting, which needs root.
    pub readahead_kb: u32,
    /// How long the kernel may cache attributes (`attr_timeout=SECONDS`,
    /// default [`DEFAULT_CACHE_TTL`]).
    pub attr_ttl: Duration,
    /// How long the kernel may cache a name's entry (`entry_timeout=SECONDS`,
    /// default [`DEFAULT_CACHE_TTL`]).
    pub entry_ttl: Duration,
    /// How long the kernel may remember that a name does not exist
    /// (`negative_timeout=SECONDS`; 0 turns it off).
    pub negative_ttl: Duration,
    /// The mount's source in the mount table (`fsname=`, default `blocktree`).
    pub fsname: String,
    /// The mount's subtype, shown as `fuse.<subtype>` (`subtype=`, default
    /// `blocktree`).
    pub subtype: String,
    /// Generic flags and options passed to the kernel as they are (`nodev`,
    /// `noexec`, `noatime`, `max_read=N`, ...).
    pub passthrough: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            allow_other: false,
            allow_root: false,
            auto_unmount: false,
            writeback_cache: true,
            threads: DEFAULT_THREADS,
            readahead_kb: DEFAULT_READAHEAD_KIB,
            attr_ttl: DEFAULT_CACHE_TTL,
            entry_ttl: DEFAULT_CACHE_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            fsname: "blocktree".into(),
            subtype: "blocktree".into(),
            passthrough: Vec::new(),
        }
    }
}

impl MountOptions {
    /// Applies `-o` lists such as `"ro,allow_other"` on top of the defaults.
    /// Later options win over earlier ones.
    pub fn parse<S: AsRef<str>>(lists: &[S]) -> Result<MountOptions, MountError> {
        let mut options = MountOptions::default();
        for list in lists {
            for option in list.as_ref().split(',').filter(|o| !o.is_empty()) {
                options.apply(option)?;
            }
        }
        if options.auto_unmount && !options.allow_other && !options.allow_root {
            return Err(invalid(
                "auto_unmount",
                "it needs allow_other or allow_root (fusermount3 unmounts for the daemon)",
            ));
        }
        Ok(options)
    }

    fn apply(&mut self, option: &str) -> Result<(), MountError> {
        let (name, value) = match option.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (option, None),
        };
        let flag = |value: Option<&str>| match value {
            None => Ok(()),
            Some(_) => Err(invalid(option, "takes no value")),
        };
        match name {
            "ro" => {
                flag(value)?;
                self.read_only = true;
            }
            "rw" => {
                flag(value)?;
                self.read_only = false;
            }
            "allow_other" => {
                flag(value)?;
                self.allow_other = true;
            }
            "allow_root" => {
                flag(value)?;
                self.allow_root = true;
            }
            "auto_unmount" => {
                flag(value)?;
                self.auto_unmount = true;
            }
            "writeback_cache" => {
                flag(value)?;
                self.writeback_cache = true;
            }
            "no_writeback_cache" => {
                flag(value)?;
                self.writeback_cache = false;
            }
            "default_permissions" => {
                return Err(invalid(
                    option,
                    "Blocktree's Authorizer checks every request itself (mode bits, \
                     owners, readcaps); the kernel's checks are not used",
                ));
            }
            "threads" => {
                let threads: usize = number(option, value)?;
                if threads == 0 || threads > MAX_THREADS {
                    return Err(invalid(
                        option,
                        &format!("needs 1 to {MAX_THREADS} threads"),
                    ));
                }
                self.threads = threads;
            }
            "readahead_kb" => {
                let kib: u32 = number(option, value)?;
                if kib > 65_536 {
                    return Err(invalid(option, "needs at most 65536 KiB"));
                }
                self.readahead_kb = kib;
            }
            "attr_timeout" => self.attr_ttl = seconds(option, value)?,
            "entry_timeout" => self.entry_ttl = seconds(option, value)?,
            "negative_timeout" => self.negative_ttl = seconds(option, value)?,
            "fsname" | "subtype" => {
                let value = value
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| invalid(option, "needs a name"))?;
                if name == "fsname" {
                    self.fsname = value.to_owned();
                } else {
                    self.subtype = value.to_owned();
                }
            }
            _ => self.passthrough.push(option.to_owned()),
        }
        Ok(())
    }

    /// True when the writeback cache is asked for: it is never used read-only.
    pub fn wants_writeback_cache(&self) -> bool {
        self.writeback_cache && !self.read_only
    }
}

fn invalid(option: &str, why: &str) -> MountError {
    MountError::Option {
        option: option.to_owned(),
        why: why.to_owned(),
    }
}

fn number<T: std::str::FromStr>(option: &str, value: Option<&str>) -> Result<T, MountError> {
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| invalid(option, "needs a whole number"))
}

fn seconds(option: &str, value: Option<&str>) -> Result<Duration, MountError> {
    let seconds: f64 = value
        .and_then(|v| v.parse().ok())
        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
        .ok_or_else(|| invalid(option, "needs a number of seconds from 0 to 86400"))?;
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_read_write_with_writeback() {
        let options = MountOptions::parse::<&str>(&[]).unwrap();
        assert_eq!(options, MountOptions::default());
        assert!(options.wants_writeback_cache());
    }

    #[test]
    fn lists_are_split_and_later_options_win() {
        let options = MountOptions::parse(&[
            "ro,allow_other",
            "noatime,threads=3,readahead_kb=0",
            "rw,max_read=65536",
        ])
        .unwrap();
        assert!(!options.read_only);
        assert!(options.allow_other);
        assert_eq!(options.threads, 3);
        assert_eq!(options.readahead_kb, 0);
        assert_eq!(options.passthrough, vec!["noatime", "max_read=65536"]);
        let read_only = MountOptions::parse(&["ro"]).unwrap();
        assert!(!read_only.wants_writeback_cache());
    }

    #[test]
    fn timeouts_and_names() {
        let options = MountOptions::parse(&[
            "attr_timeout=0.5,entry_timeout=2,negative_timeout=0,fsname=vol,subtype=bt",
        ])
        .unwrap();
        assert_eq!(options.attr_ttl, Duration::from_millis(500));
        assert_eq!(options.entry_ttl, Duration::from_secs(2));
        assert_eq!(options.negative_ttl, Duration::ZERO);
        assert_eq!(
            (options.fsname.as_str(), options.subtype.as_str()),
            ("vol", "bt")
        );
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        for bad in [
            "default_permissions",
            "threads=0",
            "threads=x",
            "readahead_kb=100000",
            "attr_timeout=-1",
            "ro=1",
            "fsname=",
            "auto_unmount",
        ] {
            let error = MountOptions::parse(&[bad]).unwrap_err().to_string();
            assert!(error.contains("invalid mount option"), "{bad}: {error}");
        }
        assert!(MountOptions::parse(&["auto_unmount,allow_other"]).is_ok());
    }
}
