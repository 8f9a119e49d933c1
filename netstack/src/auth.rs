//! Who may send unsolicited messages to a runtime (design §2.3).
//!
//! A runtime is a file, and that file's owner, group and mode bits decide who may
//! message it: a peer needs execute permission on it. The peer's authorization
//! attributes (uid and groups, assigned when it was provisioned) are looked up by
//! its principal; a principal with no known attributes, and an anonymous client,
//! are judged as "others". The classes are exclusive as in POSIX: the owner is
//! judged by the owner bits alone, a group member by the group bits, and nobody
//! holds a superuser override, because the design wants transport access to be
//! exactly what the file's permissions say.
//!
//! Replies are not subject to this check: they travel on the stream the caller
//! opened. Messages between actors of one runtime are not checked either
//! (design §2.3: separate actors with different security needs into processes).

use blocktree_core::{BtPath, PrincipalId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Execute permission for the owner.
pub const OWNER_EXECUTE: u32 = 0o100;
/// Execute permission for the group.
pub const GROUP_EXECUTE: u32 = 0o010;
/// Execute permission for others, which admits anonymous clients.
pub const OTHERS_EXECUTE: u32 = 0o001;

/// A principal's authorization attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzAttrs {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: BTreeSet<u32>,
}

impl AuthzAttrs {
    /// Attributes with a user and a primary group and no supplementary groups.
    pub fn new(uid: u32, gid: u32) -> AuthzAttrs {
        AuthzAttrs {
            uid,
            gid,
            groups: BTreeSet::new(),
        }
    }

    /// True when the principal is in group `gid`, primary or supplementary.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The parts of a runtime's file that bttp consults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeRecord {
    /// Owner of the runtime's file.
    pub uid: u32,
    /// Group of the runtime's file.
    pub gid: u32,
    /// Permission bits of the runtime's file (as in `st_mode`, e.g. `0o750`).
    pub mode: u32,
    /// Services the runtime may register (design §2.1); others are refused.
    pub services: BTreeSet<BtPath>,
}

/// Which permission bits apply to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PermissionClass {
    /// The peer's uid owns the runtime's file.
    Owner,
    /// The peer is in the file's group.
    Group,
    /// Anyone else, including anonymous clients.
    Others,
}

/// A runtime's file and the attributes of the principals it knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessPolicy {
    /// The runtime's own file.
    pub record: RuntimeRecord,
    /// Authorization attributes by principal.
    pub principals: BTreeMap<PrincipalId, AuthzAttrs>,
}

impl AccessPolicy {
    /// A policy for `record` with no known principals.
    pub fn new(record: RuntimeRecord) -> AccessPolicy {
        AccessPolicy {
            record,
            principals: BTreeMap::new(),
        }
    }

    /// Records `principal`'s attributes.
    pub fn with_principal(mut self, principal: PrincipalId, attrs: AuthzAttrs) -> AccessPolicy {
        self.principals.insert(principal, attrs);
        self
    }

    /// The class `peer` (`None`: anonymous) falls in.
    pub fn class_of(&self, peer: Option<&PrincipalId>) -> PermissionClass {
        match peer.and_then(|principal| self.principals.get(principal)) {
            Some(attrs) if attrs.uid == self.record.uid => PermissionClass::Owner,
            Some(attrs) if attrs.in_group(self.record.gid) => PermissionClass::Group,
            _ => PermissionClass::Others,
        }
    }

    /// True when `peer` (`None`: anonymous) may send unsolicited messages.
    pub fn may_execute(&self, peer: Option<&PrincipalId>) -> bool {
        let bit = match self.class_of(peer) {
            PermissionClass::Owner => OWNER_EXECUTE,
            PermissionClass::Group => GROUP_EXECUTE,
            PermissionClass::Others => OTHERS_EXECUTE,
        };
        self.record.mode & bit != 0
    }

    /// True when anonymous clients may connect at all.
    pub fn admits_anonymous(&self) -> bool {
        self.may_execute(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(byte: u8) -> PrincipalId {
        PrincipalId::from_bytes([byte; 32])
    }

    fn policy(mode: u32) -> AccessPolicy {
        let mut friend = AuthzAttrs::new(2000, 2000);
        friend.groups.insert(100);
        AccessPolicy::new(RuntimeRecord {
            uid: 1000,
            gid: 100,
            mode,
            services: BTreeSet::new(),
        })
        .with_principal(principal(1), AuthzAttrs::new(1000, 1000))
        .with_principal(principal(2), friend)
        .with_principal(principal(3), AuthzAttrs::new(3000, 3000))
    }

    #[test]
    fn classes_follow_uid_then_groups_then_others() {
        let policy = policy(0o750);
        assert_eq!(policy.class_of(Some(&principal(1))), PermissionClass::Owner);
        assert_eq!(policy.class_of(Some(&principal(2))), PermissionClass::Group);
        assert_eq!(
            policy.class_of(Some(&principal(3))),
            PermissionClass::Others
        );
        assert_eq!(
            policy.class_of(Some(&principal(4))),
            PermissionClass::Others
        );
        assert_eq!(policy.class_of(None), PermissionClass::Others);
    }

    #[test]
    fn each_class_is_judged_by_its_own_bit_only() {
        let cases = [
            (0o750, [true, true, false, false]),
            (0o700, [true, false, false, false]),
            (0o071, [false, true, true, true]),
            (0o001, [false, false, true, true]),
            (0o666, [false, false, false, false]),
        ];
        for (mode, expected) in cases {
            let policy = policy(mode);
            let got = [
                policy.may_execute(Some(&principal(1))),
                policy.may_execute(Some(&principal(2))),
                policy.may_execute(Some(&principal(3))),
                policy.may_execute(None),
            ];
            assert_eq!(got, expected, "mode {mode:o}");
            assert_eq!(policy.admits_anonymous(), expected[3]);
        }
    }
}
