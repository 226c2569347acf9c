//! Wire formats, one module each: `packet` (multicast data header),
//! `control` (TCP wave-session messages), `device` (TCP device workflow),
//! `dhcp` (DHCP/proxyDHCP options over dhcproto) and `tftp` (RFC 1350
//! with the blksize/tsize/windowsize options).
//!
//! Each has `parse` and `emit`, checks every length before reading, is
//! covered by round-trip property tests and a fuzz target (`fuzz/`), and
//! where it carries serialized types, golden bytes that pin their encoding:
//! a change to a type on the wire fails a test here until the protocol
//! version is bumped. Must not: do I/O or decide anything.

pub mod control;
pub mod device;
#[cfg(feature = "boot")]
pub mod dhcp;
#[cfg(test)]
mod golden;
pub mod packet;
pub mod tftp;
