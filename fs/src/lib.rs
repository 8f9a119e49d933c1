//! The filesystem service: inodes, directories, file handles, encryption and verification.
//!
//! Not built yet: this crate is reserved for issue #4 and deliberately exports
//! nothing, so that no caller can mistake a placeholder for a working layer.
//! See `README.md` beside this file for what it will own.
