//! Who sent a request: the uid and gid the kernel puts in every request, and the
//! supplementary groups of the calling process, read from `/proc/<pid>/status`.

use blocktree_fs::Caller;
use std::io;

/// The caller of a request from process `pid` with filesystem uid `uid` and gid
/// `gid`. Root's groups are not read: the Authorizer lets root through on uid
/// alone. A process that has exited (or the kernel's own requests, pid 0) has no
/// supplementary groups.
pub fn of_request(uid: u32, gid: u32, pid: u32) -> Caller {
    let groups = if uid == 0 || pid == 0 {
        Vec::new()
    } else {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|status| groups_in(&status))
            .unwrap_or_default()
    };
    Caller { uid, gid, groups }
}

/// The filesystem uid, gid and supplementary groups of process `pid` (for a CLI
/// acting as the user who runs it: `of_process(std::process::id())`).
pub fn of_process(pid: u32) -> io::Result<Caller> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    // "Uid:\treal\teffective\tsaved\tfilesystem"; permission checks use the last.
    let id = |label: &str| -> io::Result<u32> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(label))
            .and_then(|ids| ids.split_whitespace().nth(3))
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("/proc/{pid}/status has no {label} line with four ids"),
                )
            })
    };
    Ok(Caller {
        uid: id("Uid:")?,
        gid: id("Gid:")?,
        groups: groups_in(&status),
    })
}

/// The ids on the `Groups:` line of a `/proc/<pid>/status` text.
fn groups_in(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|id| id.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_line_is_parsed() {
        let status = "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 \nVmHWM:\t1 kB\n";
        assert_eq!(groups_in(status), vec![4, 24, 27]);
        assert_eq!(groups_in("Name:\tx\nGroups:\t\n"), Vec::<u32>::new());
        assert_eq!(groups_in(""), Vec::<u32>::new());
    }

    #[test]
    fn this_process_is_described() {
        let me = of_process(std::process::id()).unwrap();
        let again = of_request(me.uid, me.gid, std::process::id());
        assert_eq!((again.uid, again.gid), (me.uid, me.gid));
        if me.uid != 0 {
            assert_eq!(again.groups, me.groups);
        }
        assert!(of_request(1000, 1000, 0).groups.is_empty());
    }
}
