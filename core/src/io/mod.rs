//! The I/O drivers of the cores (feature `io`): sockets, threads, tokio
//! tasks, files.
//!
//! Owns: [`net`] (multicast sockets, sendmmsg/GSO, recvmmsg/GRO), [`conn`]
//! (framed control connections over TLS ([`tls`]), and the [`conn::Dialer`] whose windows
//! follow the one [`crate::backoff::Backoff`]), [`send`] (the wave sender's driver) and [`receive`]
//! (the receiver's driver: control session, resume state, writer), [`relay`]
//! (one receiver re-multicasting on its own segment), plus
//! process setup both binaries share. Must not: make protocol or workflow
//! decisions; they execute what the sans-IO cores return.

pub mod conn;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod receive;
#[cfg(feature = "redfish")]
pub mod redfish;
pub mod relay;
pub mod send;
pub mod tls;

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
