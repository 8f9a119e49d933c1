//! NBD protocol server exporting Blocktree files as volumes.
//!
//! Not built yet: this crate is reserved for issue #5 and deliberately exports
//! nothing, so that no caller can mistake a placeholder for a working layer.
//! See `README.md` beside this file for what it will own.
