//! Wire formats, one module each: `packet` (multicast data header) and
//! `control` (TCP session messages). Each has `parse` and `emit`, checks
//! every length before reading, and is covered by round-trip property tests
//! and a fuzz target (`fuzz/`).

pub mod control;
pub mod packet;
