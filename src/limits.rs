//! Caps on things held at once: the shared implementation lives in the
//! core (`rackcast_core::io::limits`), where the wave sender uses it too.

pub use rackcast_core::io::limits::*;
