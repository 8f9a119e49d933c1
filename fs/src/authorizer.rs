//! The Authorizer: POSIX permission decisions from the caller's authorization
//! attributes (uid, gid, groups) and the file's (owner, group, mode), made for
//! every operation (original design §3.2). The kernel's `default_permissions` is
//! not used, so this is the only check.

use crate::attr::{AccessMask, Caller};
use crate::error::{FsError, FsResult};
use blocktree_core::metadata::MetaSecrets;

/// Decides whether `caller` may access a file with attributes `file`.
pub fn allows(caller: &Caller, file: &MetaSecrets, wanted: AccessMask) -> bool {
    let mode = file.mode;
    if caller.uid == 0 {
        // Root reads and writes anything, and executes what anyone may execute;
        // directories are always searchable.
        let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        return !wanted.execute || is_dir || mode & 0o111 != 0;
    }
    let bits = if caller.uid == file.uid {
        (mode >> 6) & 7
    } else if caller.in_group(file.gid) {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    (!wanted.read || bits & 4 != 0)
        && (!wanted.write || bits & 2 != 0)
        && (!wanted.execute || bits & 1 != 0)
}

/// [`allows`], as an error naming what was refused.
pub fn check(caller: &Caller, file: &MetaSecrets, wanted: AccessMask) -> FsResult<()> {
    if allows(caller, file, wanted) {
        Ok(())
    } else {
        Err(FsError::Access(format!(
            "uid {} lacks {}{}{} permission (mode {:o}, owner {}:{})",
            caller.uid,
            if wanted.read { "r" } else { "" },
            if wanted.write { "w" } else { "" },
            if wanted.execute { "x" } else { "" },
            file.mode & 0o7777,
            file.uid,
            file.gid
        )))
    }
}

/// The caller owns the file, or is root: what chmod, utimes with explicit times
/// and setting most xattrs require.
pub fn check_owner(caller: &Caller, file: &MetaSecrets, what: &str) -> FsResult<()> {
    if caller.uid == 0 || caller.uid == file.uid {
        Ok(())
    } else {
        Err(FsError::NotPermitted(format!(
            "only the owner (uid {}) or root may {what}",
            file.uid
        )))
    }
}

/// In a sticky directory, only the owner of the entry, the owner of the directory
/// or root may remove or rename the entry.
pub fn check_sticky(caller: &Caller, dir: &MetaSecrets, entry: &MetaSecrets) -> FsResult<()> {
    if dir.mode & libc::S_ISVTX == 0
        || caller.uid == 0
        || caller.uid == dir.uid
        || caller.uid == entry.uid
    {
        Ok(())
    } else {
        Err(FsError::NotPermitted(
            "the directory is sticky and the caller owns neither it nor the entry".into(),
        ))
    }
}

/// chown: root may change anything; the owner may only change the group, to one
/// of their own groups.
pub fn check_chown(
    caller: &Caller,
    file: &MetaSecrets,
    uid: Option<u32>,
    gid: Option<u32>,
) -> FsResult<()> {
    if caller.uid == 0 {
        return Ok(());
    }
    let uid_ok = uid.is_none_or(|uid| uid == file.uid && caller.uid == file.uid);
    let gid_ok =
        gid.is_none_or(|gid| caller.uid == file.uid && (gid == file.gid || caller.in_group(gid)));
    if uid_ok && gid_ok {
        Ok(())
    } else {
        Err(FsError::NotPermitted(
            "only root may give a file away; the owner may change its group to one of theirs"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(uid: u32, gid: u32, mode: u32) -> MetaSecrets {
        MetaSecrets {
            uid,
            gid,
            mode,
            ..MetaSecrets::default()
        }
    }

    fn user(uid: u32, gid: u32) -> Caller {
        Caller {
            uid,
            gid,
            groups: vec![],
        }
    }

    #[test]
    fn owner_group_and_others_get_their_own_bits() {
        let f = file(1000, 100, libc::S_IFREG | 0o640);
        assert!(allows(&user(1000, 1), &f, AccessMask::WRITE));
        assert!(allows(&user(2000, 100), &f, AccessMask::READ));
        assert!(!allows(&user(2000, 100), &f, AccessMask::WRITE));
        assert!(!allows(&user(3000, 3000), &f, AccessMask::READ));
        // The owner class decides even when the group class would allow more.
        let g = file(1000, 100, libc::S_IFREG | 0o070);
        assert!(!allows(&user(1000, 100), &g, AccessMask::READ));
    }

    #[test]
    fn root_executes_only_what_someone_may() {
        let f = file(1000, 100, libc::S_IFREG | 0o600);
        assert!(allows(&Caller::root(), &f, AccessMask::WRITE));
        assert!(!allows(&Caller::root(), &f, AccessMask::EXECUTE));
        let d = file(1000, 100, libc::S_IFDIR);
        assert!(allows(&Caller::root(), &d, AccessMask::EXECUTE));
    }

    #[test]
    fn sticky_directories_protect_other_users_entries() {
        let dir = file(0, 0, libc::S_IFDIR | 0o1777);
        let entry = file(1000, 1000, libc::S_IFREG | 0o644);
        assert!(check_sticky(&user(1000, 1000), &dir, &entry).is_ok());
        assert!(check_sticky(&user(2000, 2000), &dir, &entry).is_err());
    }

    #[test]
    fn chown_rules() {
        let f = file(1000, 100, libc::S_IFREG | 0o644);
        let owner = Caller {
            uid: 1000,
            gid: 100,
            groups: vec![200],
        };
        assert!(check_chown(&owner, &f, None, Some(200)).is_ok());
        assert!(check_chown(&owner, &f, Some(2000), None).is_err());
        assert!(check_chown(&owner, &f, None, Some(300)).is_err());
        assert!(check_chown(&Caller::root(), &f, Some(2000), Some(300)).is_ok());
    }
}
