//! Network-boot cores: the DHCP / proxyDHCP answer (with the PXE boot
//! decision: which firmware gets which file) and TFTP transfers.
//!
//! Owns: decisions and transfer state, driven by parsed requests and
//! `now`. Must not: open sockets (the appliance's `boot` services do).

#[cfg(feature = "boot")]
pub mod dhcp;
pub mod tftp;
