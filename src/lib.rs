//! rackcast: images a rack of bare-metal servers at once.
//!
//! Per-device work (agent, BIOS, RAID programs) goes asynchronously over
//! TCP; the OS image goes to every device of a wave concurrently over
//! rate-controlled UDP multicast with RaptorQ coding. This crate is the
//! appliance library and holds every shared wire format; the device agent
//! (`rackcast-agent`) depends on it.

pub mod bios;
pub mod blake3_lanes;
pub mod boot;
pub mod bundle;
pub mod config;
pub mod conn;
pub mod controller;
pub mod dataplane;
pub mod fec;
pub mod manifest;
pub mod pacing;
pub mod raid;
pub mod redfish;
pub mod signing;
pub mod store;
pub mod waves;
pub mod wire;
pub mod workflow;

use std::net::Ipv4Addr;

/// The data plane allocates and frees block-sized (1 MiB) buffers all the
/// time; glibc would serve each from a fresh mmap and give it back with
/// munmap, paying page faults and zeroing for every block. Keep them on the
/// heap instead so freed blocks are reused. Call once at start.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator thresholds; called before
    // threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// An appliance holds one TCP connection per device (and a wave's
/// control connections on top): lift the soft open-file limit to the hard
/// one so a rack of 1,000 devices does not hit the default 1,024.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

/// Logs to stderr with a RUST_LOG-style filter (`info`, `rackcast=debug`);
/// a bad filter falls back to `info` rather than failing the binary.
pub fn init_logs(filter: &str) {
    let f = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_writer(std::io::stderr)
        .init();
}

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
