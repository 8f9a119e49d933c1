//! The sector engine: thread-per-core io_uring store of sectors.
//!
//! Not built yet: this crate is reserved for issue #3 and deliberately exports
//! nothing, so that no caller can mistake a placeholder for a working layer.
//! See `README.md` beside this file for what it will own.
