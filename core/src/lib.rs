//! rackcast-core: the library the appliance (`rackcast`) and the device
//! agent (`rackcast-agent`) share.
//!
//! Layers, each depending only on the ones above it:
//! - [`model`]: plain data (inventory, plan, bundle, steps, operation
//!   records) that the wire carries and the cores reason about; and the
//!   leaves [`signing`] (bundle signatures) and [`backoff`] (retry delays);
//! - [`image`]: manifest, FEC, BLAKE3 lanes;
//! - [`wire`]: every wire format (data-plane packets, wave control, device
//!   protocol, DHCP, TFTP), `parse`/`emit` with every length checked;
//! - the sans-IO cores: [`dataplane`] (wave sender and receiver),
//!   [`workflow`] (a device's steps), [`waves`] (wave scheduling),
//!   [`boot`] (DHCP/TFTP decisions), [`bios`] (diff and verify), [`raid`]
//!   (the RAID decision);
//! - `io` (feature `io`, default): the socket/thread drivers of those
//!   cores. `cargo build -p rackcast-core --no-default-features` builds
//!   everything else without tokio or socket2, which is what keeps the
//!   cores free of I/O.
//!
//! Must not: hold appliance-only parts (store, HTTP API, boot servers,
//! controller) or agent-only parts (BMC clients, program runners).

#![warn(missing_docs)]

pub mod backoff;
pub mod bios;
pub mod boot;
pub mod bringup;
pub mod dataplane;
pub mod image;
#[cfg(feature = "io")]
pub mod io;
pub mod model;
pub mod raid;
pub mod signing;
pub mod waves;
pub mod wire;
pub mod workflow;

pub use image::manifest::{BlockInfo, Manifest};
pub use model::{Bundle, Inventory, OpRecord, Plan, Step};
pub use workflow::Device;

use std::net::Ipv4Addr;

/// Groups the product accepts: administratively scoped IPv4 multicast
/// (239.0.0.0/8, RFC 2365), never global groups.
pub fn is_lab_or_admin_group(ip: Ipv4Addr) -> bool {
    ip.octets()[0] == 239
}

/// Parse a rate like `300M`, `1.5G`, `800k` or `500000000` into bits/s.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('m' | 'M') => (&s[..s.len() - 1], 1e6),
        Some('g' | 'G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("rate {s:?}: expected a number with optional k/M/G suffix"))?;
    let bps = v * mult;
    if !(1e3..=1e11).contains(&bps) {
        return Err(format!("rate {s:?} out of range (1k .. 100G bit/s)"));
    }
    Ok(bps as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("300M"), Ok(300_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("800k"), Ok(800_000));
        assert_eq!(parse_rate("5000"), Ok(5000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("").is_err());
    }

    #[test]
    fn groups() {
        assert!(is_lab_or_admin_group("239.255.1.1".parse().unwrap()));
        assert!(!is_lab_or_admin_group("198.18.0.1".parse().unwrap()));
    }
}
