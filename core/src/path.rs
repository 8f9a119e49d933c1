//! Self-certifying absolute paths.
//!
//! A path is `/<root principal id>/<component>/…`. Its first component names the
//! root key that must vouch (through a writecap chain) for any data stored under
//! it, so a reader who knows only the path can authenticate what it reads.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

use crate::principal::{PrincipalId, PrincipalParseError};

/// The longest path accepted, in bytes of its text form (as Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// The longest component accepted, in bytes (as Linux's NAME_MAX).
pub const MAX_COMPONENT_LEN: usize = 255;

/// An absolute Blocktree path.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BtPath {
    root: PrincipalId,
    components: Vec<String>,
}

/// Why text is not a valid path.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    /// The text is empty.
    #[error("empty path")]
    Empty,
    /// The text does not start with `/`.
    #[error("a path is absolute: it starts with '/'")]
    NotAbsolute,
    /// Two slashes in a row, or a trailing slash.
    #[error("empty component at position {0}")]
    EmptyComponent(usize),
    /// A `.` or `..` component.
    #[error("'{0}' is not allowed as a path component")]
    DotComponent(String),
    /// A component containing a NUL byte.
    #[error("NUL byte in component {0}")]
    NulByte(usize),
    /// The first component is not a principal id.
    #[error("the first component must be the root principal id: {0}")]
    NotAPrincipal(#[from] PrincipalParseError),
    /// Over [`MAX_PATH_LEN`] bytes.
    #[error("path is {0} bytes; the limit is {MAX_PATH_LEN}")]
    TooLong(usize),
    /// A component over [`MAX_COMPONENT_LEN`] bytes.
    #[error("component {index} is {len} bytes; the limit is {MAX_COMPONENT_LEN}")]
    ComponentTooLong {
        /// Which component (0 is the root principal).
        index: usize,
        /// Its length.
        len: usize,
    },
}

impl BtPath {
    /// The path of a root directory: `/<root>`.
    pub fn root_of(root: PrincipalId) -> BtPath {
        BtPath {
            root,
            components: Vec::new(),
        }
    }

    /// The root principal named by the first component.
    pub fn root(&self) -> PrincipalId {
        self.root
    }

    /// The components after the root principal.
    pub fn components(&self) -> &[String] {
        &self.components
    }

    /// True when `other` is this path or lies beneath it.
    pub fn contains(&self, other: &BtPath) -> bool {
        self.root == other.root && other.components.starts_with(&self.components)
    }

    /// The enclosing directory; `None` for a root path.
    pub fn parent(&self) -> Option<BtPath> {
        let (_, rest) = self.components.split_last()?;
        Some(BtPath {
            root: self.root,
            components: rest.to_vec(),
        })
    }

    /// This path extended by one component.
    pub fn join(&self, component: &str) -> Result<BtPath, PathError> {
        check_component(component, self.components.len() + 1)?;
        let mut components = self.components.clone();
        components.push(component.to_owned());
        let joined = BtPath {
            root: self.root,
            components,
        };
        let len = joined.text_len();
        if len > MAX_PATH_LEN {
            return Err(PathError::TooLong(len));
        }
        Ok(joined)
    }

    fn text_len(&self) -> usize {
        1 + crate::principal::PRINCIPAL_TEXT_LEN
            + self.components.iter().map(|c| c.len() + 1).sum::<usize>()
    }
}

fn check_component(component: &str, index: usize) -> Result<(), PathError> {
    match component {
        "" => Err(PathError::EmptyComponent(index)),
        "." | ".." => Err(PathError::DotComponent(component.to_owned())),
        _ if component.len() > MAX_COMPONENT_LEN => Err(PathError::ComponentTooLong {
            index,
            len: component.len(),
        }),
        _ if component.contains('\0') => Err(PathError::NulByte(index)),
        // '/' cannot occur: components come from splitting on it, or from join.
        _ if component.contains('/') => Err(PathError::EmptyComponent(index)),
        _ => Ok(()),
    }
}

impl FromStr for BtPath {
    type Err = PathError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(PathError::Empty);
        }
        if text.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(text.len()));
        }
        let rest = text.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
        let mut parts = rest.split('/');
        let first = parts.next().unwrap_or_default();
        if first.is_empty() {
            return Err(PathError::EmptyComponent(0));
        }
        let root: PrincipalId = first.parse()?;
        let mut components = Vec::new();
        for (offset, part) in parts.enumerate() {
            check_component(part, offset + 1)?;
            components.push(part.to_owned());
        }
        Ok(BtPath { root, components })
    }
}

impl TryFrom<String> for BtPath {
    type Error = PathError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<BtPath> for String {
    fn from(path: BtPath) -> String {
        path.to_string()
    }
}

impl fmt::Display for BtPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.root)?;
        for component in &self.components {
            write!(f, "/{component}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BtPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BtPath({self})")
    }
}
