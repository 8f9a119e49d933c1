//! The sector service: openraft log and state machine over the sector engine.
//!
//! Not built yet: this crate is reserved for issue #7 and deliberately exports
//! nothing, so that no caller can mistake a placeholder for a working layer.
//! See `README.md` beside this file for what it will own.
