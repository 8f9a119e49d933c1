//! Message addresses (design §2.1): actor names and service names.
//!
//! An actor is named by the path of the runtime hosting it and a UUID that is
//! unique in that runtime. A service is named by its path, a scope saying which
//! runtimes may receive the message, whether the search goes rootward from the
//! scope, and an id picking one provider of the service.

use blocktree_core::BtPath;
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;
use uuid::Uuid;

/// The longest text service id accepted, in bytes (as a path component).
pub const MAX_SERVICE_ID_LEN: usize = 255;

/// One actor: the runtime that hosts it and its id in that runtime.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ActorName {
    /// The path of the hosting runtime.
    pub runtime: BtPath,
    /// The actor's id, unique within the runtime.
    pub id: Uuid,
}

impl ActorName {
    /// Names actor `id` of the runtime at `runtime`.
    pub fn new(runtime: BtPath, id: Uuid) -> ActorName {
        ActorName { runtime, id }
    }
}

impl fmt::Display for ActorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.runtime, self.id)
    }
}

/// Which provider of a service a message is for; opaque to the runtime.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "ServiceIdRepr", into = "ServiceIdRepr")]
pub enum ServiceId {
    /// A UUID.
    Uuid(Uuid),
    /// A name of at most [`MAX_SERVICE_ID_LEN`] bytes.
    Name(String),
}

/// A text service id over [`MAX_SERVICE_ID_LEN`] bytes.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("a service id is at most {MAX_SERVICE_ID_LEN} bytes, not {0}")]
pub struct ServiceIdTooLong(pub usize);

impl ServiceId {
    /// A text id, checked against [`MAX_SERVICE_ID_LEN`].
    pub fn name(name: impl Into<String>) -> Result<ServiceId, ServiceIdTooLong> {
        let name = name.into();
        if name.len() > MAX_SERVICE_ID_LEN {
            return Err(ServiceIdTooLong(name.len()));
        }
        Ok(ServiceId::Name(name))
    }
}

// The wire form, so a decoded id is held to the same bound as a built one.
#[derive(Serialize, Deserialize)]
enum ServiceIdRepr {
    Uuid(Uuid),
    Name(String),
}

impl TryFrom<ServiceIdRepr> for ServiceId {
    type Error = ServiceIdTooLong;
    fn try_from(repr: ServiceIdRepr) -> Result<Self, Self::Error> {
        match repr {
            ServiceIdRepr::Uuid(id) => Ok(ServiceId::Uuid(id)),
            ServiceIdRepr::Name(name) => ServiceId::name(name),
        }
    }
}

impl From<ServiceId> for ServiceIdRepr {
    fn from(id: ServiceId) -> Self {
        match id {
            ServiceId::Uuid(id) => ServiceIdRepr::Uuid(id),
            ServiceId::Name(name) => ServiceIdRepr::Name(name),
        }
    }
}

impl From<Uuid> for ServiceId {
    fn from(id: Uuid) -> Self {
        ServiceId::Uuid(id)
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceId::Uuid(id) => write!(f, "{id}"),
            ServiceId::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// A message for some provider of a service, as the design's service name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceName {
    /// The path identifying the service.
    pub service: BtPath,
    /// The directory the intended recipient is in (or under, with `rootward`).
    pub scope: BtPath,
    /// False: deliver to a runtime directly contained in `scope`. True: deliver to
    /// the runtime providing the service whose directory is the closest ancestor
    /// of `scope` (or `scope` itself).
    pub rootward: bool,
    /// Which provider of the service.
    pub id: ServiceId,
}

impl ServiceName {
    /// True when a runtime at `runtime` may receive messages for this name.
    pub fn admits(&self, runtime: &BtPath) -> bool {
        self.distance(runtime).is_some()
    }

    /// How far a runtime at `runtime` is from the scope, when it is admitted:
    /// 0 for a runtime directly in the scope, 1 for one in its parent, …
    pub fn distance(&self, runtime: &BtPath) -> Option<usize> {
        // Computed on every message, so without building the parent path. A
        // runtime at a domain's root path (a server whose writecap is the whole
        // domain) lives in the root directory itself.
        let directory = runtime
            .components()
            .split_last()
            .map_or(&[][..], |(_, directory)| directory);
        let scope = self.scope.components();
        let inside = runtime.root() == self.scope.root()
            && if self.rootward {
                scope.starts_with(directory)
            } else {
                scope == directory
            };
        inside.then(|| scope.len() - directory.len())
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direction = if self.rootward { " rootward" } else { "" };
        write!(
            f,
            "service {} in {}{direction} id {}",
            self.service, self.scope, self.id
        )
    }
}

/// Where a message goes: one actor, or a provider of a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Name {
    /// A specific actor.
    Actor(ActorName),
    /// A provider of a service.
    Service(ServiceName),
}

impl From<ActorName> for Name {
    fn from(name: ActorName) -> Self {
        Name::Actor(name)
    }
}

impl From<ServiceName> for Name {
    fn from(name: ServiceName) -> Self {
        Name::Service(name)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Name::Actor(name) => write!(f, "actor {name}"),
            Name::Service(name) => write!(f, "{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocktree_core::PrincipalId;

    fn path(components: &[&str]) -> BtPath {
        components
            .iter()
            .fold(BtPath::root_of(PrincipalId::from_bytes([3; 32])), |p, c| {
                p.join(c).unwrap()
            })
    }

    fn service(scope: &[&str], rootward: bool) -> ServiceName {
        ServiceName {
            service: path(&["svc", "echo"]),
            scope: path(scope),
            rootward,
            id: ServiceId::name("x").unwrap(),
        }
    }

    #[test]
    fn direct_scope_admits_only_runtimes_in_that_directory() {
        let name = service(&["a", "b"], false);
        assert!(name.admits(&path(&["a", "b", "rt"])));
        assert!(!name.admits(&path(&["a", "rt"])));
        assert!(!name.admits(&path(&["a", "b", "c", "rt"])));
        assert!(!name.admits(&path(&[])));
    }

    #[test]
    fn rootward_scope_admits_ancestors_and_ranks_by_distance() {
        let name = service(&["a", "b"], true);
        assert_eq!(name.distance(&path(&["a", "b", "rt"])), Some(0));
        assert_eq!(name.distance(&path(&["a", "rt"])), Some(1));
        assert_eq!(name.distance(&path(&["rt"])), Some(2));
        assert_eq!(name.distance(&path(&["a", "b", "c", "rt"])), None);
        assert_eq!(name.distance(&path(&["x", "rt"])), None);
    }

    #[test]
    fn long_service_ids_are_refused_when_built_and_decoded() {
        assert!(ServiceId::name("a".repeat(MAX_SERVICE_ID_LEN)).is_ok());
        assert_eq!(
            ServiceId::name("a".repeat(MAX_SERVICE_ID_LEN + 1)),
            Err(ServiceIdTooLong(MAX_SERVICE_ID_LEN + 1))
        );
        let bytes = postcard::to_allocvec(&ServiceIdRepr::Name("a".repeat(MAX_SERVICE_ID_LEN + 1)))
            .unwrap();
        assert!(postcard::from_bytes::<ServiceId>(&bytes).is_err());
    }
}
