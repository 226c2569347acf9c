//! Wire formats, one module each: `packet` (multicast data header) and
//! `control` (TCP wave-session messages), `device` (TCP device workflow). Each has `parse` and `emit`, checks
//! every length before reading, and is covered by round-trip property tests
//! and a fuzz target (`fuzz/`).

pub mod control;
pub mod device;
pub mod packet;
