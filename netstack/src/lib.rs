//! bttp: the authenticated QUIC message transport and actor runtime.
//!
//! Not built yet: this crate is reserved for issue #6 and deliberately exports
//! nothing, so that no caller can mistake a placeholder for a working layer.
//! See `README.md` beside this file for what it will own.
