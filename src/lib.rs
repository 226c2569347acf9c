//! rackcast, the appliance: images a rack of bare-metal servers at once.
//!
//! Per-device work (agent, BIOS, RAID programs) goes asynchronously over
//! TCP; the OS image goes to every device of a wave concurrently over
//! rate-controlled UDP multicast with RaptorQ coding.
//!
//! Owns: the appliance's parts: configuration ([`config`]), the durable
//! store ([`store`]), the boot services ([`boot`]: DHCP/proxyDHCP, TFTP,
//! per-device iPXE over HTTP) and the controller ([`controller`]: device
//! sessions, bundles, images, waves, the HTTP API). Must not: define a
//! wire format or a protocol decision; those live once, in
//! `rackcast-core`, which the agent shares.

pub mod bmc;
pub mod boot;
pub mod bringup;
pub mod config;
pub mod controller;
pub mod download;
pub mod enroll;
pub mod identity;
pub mod image_source;
pub mod limits;
pub mod secret;
pub mod store;
pub mod watch;

#[cfg(test)]
mod metrics_catalog_tests;
